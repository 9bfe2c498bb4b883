"""store="disk" (generate/run_folder.py) and store="auto": same images as the host store, exact resume
from the run folder, one-line errors for unusable folders."""
import json
import math
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import zsq_fast
from zsq_fast.generate import api, run_folder
from zsq_fast.generate.run_folder import RunFolderError
from zsq_fast.generate.shards import CANVAS_BLOCK, initial_canvases
from zsq_fast.generate.store import choose_store
from test_generate import Killed, tiny


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


COMMON = dict(iterations=6, chunk_size=3, lr=0.2, seed=7)


def test_initial_noise_of_an_image_depends_on_seed_and_index_only():
    lo, hi = torch.full((3,), -2.0), torch.full((3,), 2.0)
    n = 2 * CANVAS_BLOCK + 5
    shape = (n, 3, 5, 5)
    whole = torch.cat([b for _, b in initial_canvases(3, shape, lo, hi)])
    assert whole.shape == shape and float(whole.abs().max()) <= 2.0
    assert 0.8 < float(whole.std()) < 1.1  # clipped N(0, 1)
    for start, stop in [(0, 1), (3, CANVAS_BLOCK + 1), (CANVAS_BLOCK - 1, n), (n - 2, n)]:
        blocks = list(initial_canvases(3, shape, lo, hi, start, stop))
        assert torch.equal(torch.cat([b for _, b in blocks]), whole[start:stop]), (start, stop)
        assert blocks[0][0].start == 0 and blocks[-1][0].stop == stop - start
    # a larger set begins with the same images; another seed gives others
    longer = torch.cat([b for _, b in initial_canvases(3, (n + 40, 3, 5, 5), lo, hi)])
    assert torch.equal(longer[:n], whole)
    other = torch.cat([b for _, b in initial_canvases(4, shape, lo, hi)])
    assert not torch.equal(other, whole)
    # blocks are not shifted copies of each other
    assert not torch.equal(whole[:5], whole[CANVAS_BLOCK:CANVAS_BLOCK + 5])


@pytest.mark.parametrize("method,kw", [("dgh", {"aggregation": "exact"}), ("dgh", {"aggregation": "stale"}),
                                       ("bns", {})])
def test_disk_store_equals_host_store(tmp_path, method, kw):
    host, rec_host = zsq_fast.generate(tiny(), 7, method, 8, **COMMON, **kw)
    disk, rec_disk = zsq_fast.generate(tiny(), 7, method, 8, store="disk", checkpoint=tmp_path / "run",
                                       **COMMON, **kw)
    assert torch.equal(disk, host)
    assert rec_disk.losses == rec_host.losses and rec_disk.final_bn_loss == rec_host.final_bn_loss
    assert rec_disk.store == {"kind": "disk", "reason": "requested", "folder": str(tmp_path / "run")}
    assert rec_host.store["kind"] == "host"
    names = sorted(os.listdir(tmp_path / "run"))
    assert names == ["exp_avg.0.f32", "exp_avg.1.f32", "exp_avg_sq.0.f32", "exp_avg_sq.1.f32", "images.f32",
                     "run.json", "state.prev.pt", "state.pt", "x.0.f32", "x.1.f32"]
    # two buffers of canvases (augmented dgh: a margin around the output view); step 6 wrote buffer 0
    shape = json.loads((tmp_path / "run" / "run.json").read_text())["shape"]
    assert all(os.path.getsize(tmp_path / "run" / f"x.{b}.f32") == 4 * math.prod(shape) for b in (0, 1))
    last = torch.from_file(str(tmp_path / "run" / "x.0.f32"), size=math.prod(shape)).view(*shape)
    if method == "bns":  # no views: the canvases are the output images
        assert torch.equal(last, host)
    # without a folder: a temporary one, removed after the run; the images stay readable
    temp, rec_temp = zsq_fast.generate(tiny(), 7, method, 8, store="disk", **COMMON, **kw)
    assert torch.equal(temp, host) and "folder" not in rec_temp.store


@pytest.mark.parametrize("kw", [{"aggregation": "exact"}, {"aggregation": "stale"}])
def test_resume_from_the_run_folder_equals_the_uninterrupted_run(tmp_path, kw):
    full, rec_full = zsq_fast.generate(tiny(), 7, "dgh", 8, **COMMON, **kw)

    def stop_at_4(step, total, losses):
        if step == 4:
            raise Killed
    with pytest.raises(Killed):
        zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", progress=stop_at_4,
                          **COMMON, **kw)
    assert _saved_step(tmp_path / "run") == 4  # stopped between steps
    assert not (tmp_path / "run" / "images.f32").exists()
    resumed, rec = zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", **COMMON, **kw)
    assert rec.resumed_from_step == 4
    assert torch.equal(resumed, full)
    assert rec.losses == rec_full.losses
    # a finished folder resumes to the same result without a step
    again, rec_again = zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run",
                                         **COMMON, **kw)
    assert torch.equal(again, full) and rec_again.resumed_from_step == 6 and rec_again.steps_done == 6
    assert torch.equal(resumed, full)  # the first result stays readable after the output was rewritten


@pytest.mark.parametrize("kw", [{"aggregation": "exact"}, {"aggregation": "stale"}])
def test_a_run_stopped_inside_a_step_is_rolled_back_and_resumes_exactly(tmp_path, monkeypatch, kw):
    full, rec_full = zsq_fast.generate(tiny(), 7, "dgh", 8, **COMMON, **kw)
    from zsq_fast.generate import dgh
    real_update = dgh.update

    def stop_in_step_3(run, sl, x, grad, m, v):
        real_update(run, sl, x, grad, m, v)
        if run.step == 3 and sl.start > 0:
            raise Killed  # chunks 0 and 1 of step 3 are written, chunk 2 is not
    monkeypatch.setattr(dgh, "update", stop_in_step_3)
    with pytest.raises(Killed):
        zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", **COMMON, **kw)
    monkeypatch.undo()
    assert _saved_step(tmp_path / "run") == 2  # step 3 was never committed
    resumed, rec = zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", **COMMON, **kw)
    assert rec.resumed_from_step == 2
    assert torch.equal(resumed, full) and rec.losses == rec_full.losses


def _saved_step(folder) -> int:
    return int(torch.load(folder / "state.pt", weights_only=True)["step"])


def test_a_run_stopped_after_a_steps_writes_but_before_its_commit_resumes_exactly(tmp_path, monkeypatch):
    full, rec_full = zsq_fast.generate(tiny(), 7, "dgh", 8, **COMMON)
    real_commit = run_folder._atomic_write

    def stop_at_commit_of_5(path, write):
        if path.name == "state.pt" and path.exists() and _saved_step(path.parent) == 4:
            raise Killed  # every chunk of step 5 is in its buffer, state.pt still says 4
        real_commit(path, write)
    monkeypatch.setattr(run_folder, "_atomic_write", stop_at_commit_of_5)
    with pytest.raises(Killed):
        zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", **COMMON)
    monkeypatch.undo()
    resumed, rec = zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", **COMMON)
    assert rec.resumed_from_step == 4
    assert torch.equal(resumed, full) and rec.losses == rec_full.losses


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import zsq_fast
from zsq_fast.generate import dgh
from test_generate import tiny
real_update = dgh.update
def update(run, sl, x, grad, m, v):
    real_update(run, sl, x, grad, m, v)
    if run.step == {step} and sl.start > 0:
        os.kill(os.getpid(), signal.SIGKILL)
dgh.update = update
zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint={folder!r}, **{common!r})
"""


def test_kill_9_inside_a_step_resumes_to_the_uninterrupted_images(tmp_path):
    full, _ = zsq_fast.generate(tiny(), 7, "dgh", 8, **COMMON)
    folder = str(tmp_path / "run")
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), step=4, folder=folder, common=COMMON)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _saved_step(tmp_path / "run") == 3
    resumed, rec = zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=folder, **COMMON)
    assert rec.resumed_from_step == 3 and torch.equal(resumed, full)


def test_a_folder_of_the_undo_log_format_is_refused(tmp_path):
    run = tmp_path / "run"
    zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **{**COMMON, "iterations": 2})
    cfg = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**cfg, "format": 1}))
    with pytest.raises(RunFolderError, match="older zsq_fast \\(run folder format 1, this one reads 2\\)") as e:
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **{**COMMON, "iterations": 2})
    one_line(e)


def one_line(excinfo):
    msg = str(excinfo.value)
    err = excinfo.value
    assert "\n" not in msg and err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return msg


def test_unusable_run_folders_give_one_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **{**COMMON, "iterations": 2})
    # another configuration
    with pytest.raises(RunFolderError, match="another run configuration \\(lr\\)") as e:
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **{**COMMON, "iterations": 2,
                                                                                  "lr": 0.3})
    one_line(e)
    # corrupted metadata: state and configuration files
    state = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(RunFolderError, match="state.pt is corrupted") as e:
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **{**COMMON, "iterations": 2})
    one_line(e)
    (run / "run.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="run.json is corrupted") as e:
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **{**COMMON, "iterations": 2})
    one_line(e)
    # a truncated data file
    other = tmp_path / "other"
    zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=other, **{**COMMON, "iterations": 2})
    os.truncate(other / "exp_avg.1.f32", 100)
    with pytest.raises(RunFolderError, match="exp_avg.1.f32 holds 100 bytes"):
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=other, **{**COMMON, "iterations": 2})
    # not a folder / not creatable / someone else's files
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=tmp_path / "file", iterations=1)
    with pytest.raises(RunFolderError, match="cannot be created") as e:
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=tmp_path / "file" / "run", iterations=1)
    one_line(e)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunFolderError, match="holds other files \\(notes.txt\\)"):
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=tmp_path / "mine", iterations=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # unwritable (as root, permissions do not stop writes: the access check is simulated)
    monkeypatch.setattr(run_folder.os, "access", lambda path, mode: False)
    with pytest.raises(RunFolderError, match="is not writable"):
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=tmp_path / "new", iterations=1)
    monkeypatch.undo()
    # a full disk is found before anything is written
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=0, free=1000))
    with pytest.raises(RunFolderError, match="not enough disk space.*GiB free") as e:
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=tmp_path / "full", iterations=1)
    one_line(e)
    assert not (tmp_path / "full" / "run.json").exists()


def test_auto_store_choice_and_record():
    gib = 2 ** 30
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_store(1 * gib, cpu, free_host=4 * gib)[0] == "host"
    kind, reason = choose_store(3 * gib, cpu, free_host=4 * gib)
    assert kind == "disk" and "3.00 GiB > 0.5 x 4.00 GiB free host memory" in reason
    assert choose_store(1 * gib, cuda, free_device=4 * gib, free_host=1 * gib)[0] == "device"
    assert choose_store(3 * gib, cuda, free_device=4 * gib, free_host=8 * gib)[0] == "host"
    assert choose_store(5 * gib, cuda, free_device=4 * gib, free_host=8 * gib)[0] == "disk"
    images, rec = zsq_fast.generate(tiny(), 4, "dgh", 8, store="auto", iterations=1, chunk_size=2)
    assert rec.settings["store"] == "auto" and rec.store["kind"] == "host"
    assert "free host memory" in rec.store["reason"]
    with pytest.raises(ValueError, match="store must be one of"):
        zsq_fast.generate(tiny(), 4, "dgh", 8, store="ssd", iterations=1)


def test_build_run_without_a_folder_for_disk_is_an_error():
    model = tiny().eval().requires_grad_(False)
    s, dev = api.make_settings(model, 4, "dgh", 8, store="disk")
    with pytest.raises(ValueError, match="needs a run folder"):
        api.build_run(model, s, dev)


def test_load_images_opens_a_run_folder_lazily(tmp_path):
    images, _ = zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=tmp_path / "run", iterations=2,
                                  chunk_size=2)
    back, labels = zsq_fast.load_images(tmp_path / "run", with_labels=True)
    assert torch.equal(back, images) and labels is None and back.shape == (5, 3, 8, 8)
    (tmp_path / "run" / "images.f32").unlink()
    with pytest.raises(RunFolderError, match="no finished output"):
        zsq_fast.load_images(tmp_path / "run")


def test_a_restart_after_unsynced_steps_is_refused(tmp_path, monkeypatch):
    def stop_at_4(step, total, losses):
        if step == 4:
            raise Killed
    common = {**COMMON, "checkpoint_every": 3}
    with pytest.raises(Killed):
        zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", progress=stop_at_4,
                          **common)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert (state["step"], state["synced_step"]) == (4, 3) and state["boot_id"] == run_folder.boot_id()
    monkeypatch.setattr(run_folder, "boot_id", lambda: "another-boot")
    with pytest.raises(RunFolderError, match="machine restarted after step 4 .*last synced at step 3") as e:
        zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", **common)
    one_line(e)
    monkeypatch.undo()  # the same boot: the page cache still holds step 4
    full, _ = zsq_fast.generate(tiny(), 7, "dgh", 8, **common)
    resumed, rec = zsq_fast.generate(tiny(), 7, "dgh", 8, store="disk", checkpoint=tmp_path / "run", **common)
    assert rec.resumed_from_step == 4 and torch.equal(resumed, full)


def test_auto_resumes_where_the_run_was_stored(tmp_path, monkeypatch):
    from zsq_fast.generate import store as store_mod
    common = dict(iterations=2, chunk_size=2, store="auto")
    monkeypatch.setattr(store_mod, "free_host_bytes", lambda: 1000)  # the set does not fit: disk
    _, rec = zsq_fast.generate(tiny(), 4, "dgh", 8, checkpoint=tmp_path / "run", **common)
    assert rec.store["kind"] == "disk" and "> 0.5 x" in rec.store["reason"]
    monkeypatch.undo()  # memory is free now, but the run lives in its folder
    _, rec = zsq_fast.generate(tiny(), 4, "dgh", 8, checkpoint=tmp_path / "run", **common)
    assert rec.store["kind"] == "disk" and rec.store["reason"].startswith("resuming the run folder")
    assert rec.resumed_from_step == 2
    zsq_fast.generate(tiny(), 4, "dgh", 8, checkpoint=tmp_path / "c.pt", iterations=2, chunk_size=2)
    monkeypatch.setattr(store_mod, "free_host_bytes", lambda: 1000)
    _, rec = zsq_fast.generate(tiny(), 4, "dgh", 8, checkpoint=tmp_path / "c.pt", **common)
    assert rec.store["kind"] == "host" and rec.resumed_from_step == 2


def test_step_back_returns_the_folder_to_the_previous_step(tmp_path):
    """A sharded run's rank one step ahead steps back (run_folder.step_back): the previous step's images are
    still in the other buffer and its state in state.prev.pt; resuming from there gives the uninterrupted
    images. Stepping back from step 1 leaves the initial canvases (no state)."""
    kw = {**COMMON, "iterations": 3}
    ref, _ = zsq_fast.generate(tiny(), 5, "dgh", 8, **kw)
    run = tmp_path / "run"
    zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **kw)
    shape = tuple(json.loads((run / "run.json").read_text())["shape"])
    store = run_folder.DiskStore(run, shape, step=3)
    try:
        assert int(run_folder.step_back(store)["step"]) == 2 and store.step == 2
        with pytest.raises(RunFolderError, match="no saved state of step 1"):
            run_folder.step_back(store)  # only one step back is kept
    finally:
        store.close()
    images, rec = zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run, **kw)
    assert rec.resumed_from_step == 2
    torch.testing.assert_close(images, ref, rtol=0, atol=0)
    run1 = tmp_path / "run1"
    def stop_after_1(step, total, losses):
        if step == 1:
            raise Killed
    with pytest.raises(Killed):  # step 1 committed, then the run stops
        zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run1, progress=stop_after_1, **kw)
    store = run_folder.DiskStore(run1, shape, step=1)
    try:
        assert run_folder.step_back(store) is None and not (run1 / "state.pt").exists()
    finally:
        store.close()
    images, rec = zsq_fast.generate(tiny(), 5, "dgh", 8, store="disk", checkpoint=run1, **kw)
    assert rec.resumed_from_step is None
    torch.testing.assert_close(images, ref, rtol=0, atol=0)


def test_host_store_is_filled_block_by_block():
    # the host/device store is filled from the seeded noise blocks in place (no whole-set copy beside it):
    # the result equals the concatenated blocks, and blocks that do not cover the set are an error
    from zsq_fast.generate.store import fill_store

    blocks = [(slice(0, 3), torch.randn(3, 3, 4, 4)), (slice(3, 5), torch.randn(2, 3, 4, 4))]
    store = fill_store((5, 3, 4, 4), blocks, torch.device("cpu"))
    assert torch.equal(store.x, torch.cat([b for _, b in blocks]))
    assert not store.exp_avg.any() and not store.exp_avg_sq.any()
    with pytest.raises(ValueError, match="cover 3 of 5"):
        fill_store((5, 3, 4, 4), blocks[:1], torch.device("cpu"))
