"""Generation on a 2-rank gloo group (CPU, spawned processes) against one process: the same images for
the same seed and N, sharded checkpoints and outputs, a dead rank named, an exact resume."""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zsq_fast
from test_generate import tiny
from zsq_fast import distributed as zd
from zsq_fast.generate import sharded_run
from zsq_fast.generate.shards import global_stats, plan
from zsq_fast.ops import channel_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

N, SIZE = 7, 8
COMMON = dict(iterations=5, chunk_size=3, lr=0.2, seed=7)
# fp32 images after a few steps: the ranks merge the whole-set float64 statistics in another order,
# which moves the injected gradients by ~1e-16 relative; RAdam turns that into a few fp32 ulps
ATOL = 2e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fdda_kw():
    return dict(real_images=torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)),
                real_labels=torch.arange(5))


def _far_from_zero() -> torch.Tensor:
    """12 x 3 x 4 x 4 float64 activations with mean 1e4 and std 1e-2 per channel: sum / sum-of-squares
    statistics lose ~8 of float64's 16 digits of the variance here."""
    g = torch.Generator().manual_seed(5)
    return 1e4 + 1e-2 * torch.randn(12, 3, 4, 4, generator=g, dtype=torch.float64)


def _worker(rank, world, port, out_dir, jobs, env):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)
    zd.init_from_env("cpu", timeout_s=60)
    try:
        for name, method, kw in jobs:  # one group for several runs: starting processes is the slow part
            if method == "stats":  # shards.global_stats on this rank's part of _far_from_zero()
                x = _far_from_zero()[[slice(0, 5), slice(5, 12)][rank]]
                torch.save(global_stats([channel_stats(x)])[0].data, os.path.join(out_dir, f"{name}.r{rank}.pt"))
                continue
            if method == "fdda":
                kw = {**kw, **_fdda_kw()}
            try:
                images, rec = zsq_fast.generate(tiny(), N, method, SIZE, **kw)
            except zsq_fast.errors.ZsqFastError as e:
                with open(os.path.join(out_dir, f"{name}.r{rank}.err"), "w") as f:
                    f.write(f"{type(e).__name__}: {e}")
                if isinstance(e, zd.DistributedError):
                    raise SystemExit(3)
                continue
            torch.save({"images": images, "record": rec.to_dict()}, os.path.join(out_dir, f"{name}.r{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(tmp_path, jobs, world=2, env=None):
    """Run the jobs [(name, method, generate kwargs)] one after the other on `world` spawned gloo ranks;
    (exit codes, {name: [per-rank result, or the error's text, or None]})."""
    out = tmp_path / "results"
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out), jobs, env or {})) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    results = {}
    for name, _, _ in jobs:
        results[name] = []
        for r in range(world):
            pt, err = out / f"{name}.r{r}.pt", out / f"{name}.r{r}.err"
            results[name].append(torch.load(pt, weights_only=False) if pt.exists() else
                                 err.read_text() if err.exists() else None)
    return [p.exitcode for p in procs], results


def _whole(results):
    return torch.cat([r["images"] for r in results])


STALE = dict(COMMON, aggregation="stale")
JOBS = [("dgh", "dgh", dict(COMMON, aggregation="exact")), ("bns", "bns", COMMON), ("fdda", "fdda", COMMON),
        ("stale_1", "dgh", dict(STALE, iterations=1)), ("stale_8", "dgh", dict(STALE, iterations=8, lr=1.0)),
        ("too_few_chunks", "dgh", dict(COMMON, chunk_size=8)), ("disk", "dgh", dict(COMMON, store="disk")),
        ("stats", "stats", {}), ("bad_checkpoint", "dgh", COMMON)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every job of JOBS run once on two gloo ranks (the disk job into a sharded checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    (tmp / "bad").mkdir()
    (tmp / "bad" / "rank-00001.pt").write_bytes(b"not a checkpoint")  # rank 1 alone finds it unreadable
    folders = {"disk": tmp / "ck", "bad_checkpoint": tmp / "bad"}
    jobs = [(name, method, dict(kw, checkpoint=str(folders[name])) if name in folders else kw)
            for name, method, kw in JOBS]
    codes, results = run_ranks(tmp, jobs)
    assert codes == [0, 0], (codes, results)
    return tmp, results


@pytest.mark.parametrize("method", ["dgh", "bns", "fdda"])
def test_two_ranks_give_the_images_of_one_process(two_ranks, method):
    kw = next(kw for name, _, kw in JOBS if name == method)
    one, rec_one = zsq_fast.generate(tiny(), N, method, SIZE, **kw, **(_fdda_kw() if method == "fdda" else {}))
    results = two_ranks[1][method]
    parts = [r["record"]["shard"] for r in results]
    assert [p["rank"] for p in parts] == [0, 1] and all(p["world_size"] == 2 and p["n_images"] == N for p in parts)
    assert parts[0]["start"] == 0 and parts[0]["stop"] == parts[1]["start"] and parts[1]["stop"] == N
    two = _whole(results)
    assert two.shape == one.shape
    torch.testing.assert_close(two, one, rtol=0, atol=ATOL)
    # every rank reports the whole set's losses, as one process does
    for r in results:
        rec = r["record"]
        assert [h["step"] for h in rec["losses"]] == [h["step"] for h in rec_one.losses]
        for mine, ref in zip(rec["losses"], rec_one.losses):
            assert set(mine) == set(ref)
            for k in ref:
                assert mine[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-9), (k, mine[k], ref[k])
        assert rec["final_bn_loss"] == pytest.approx(rec_one.final_bn_loss, rel=1e-6)
        assert rec["initial_bn_loss"] == pytest.approx(rec_one.initial_bn_loss, rel=1e-9)
    if method == "fdda":
        assert torch.equal(torch.tensor(results[0]["record"]["labels"] + results[1]["record"]["labels"]),
                           rec_one.labels)


def test_whole_set_statistics_across_ranks_keep_the_variance_of_large_means(two_ranks):
    x = _far_from_zero()
    one = channel_stats(x)  # one process: the kernel's merge over the whole set
    ref_var = x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
    data = two_ranks[1]["stats"]
    assert torch.equal(data[0], data[1])  # every rank holds the same numbers, bit for bit
    torch.testing.assert_close(data[0][0], one.mean, rtol=1e-15, atol=0)
    var = data[0][1] / x[:, 0].numel()
    assert float(((var - ref_var) / ref_var).abs().max()) < 1e-9
    # what all-reducing count, sum and sum of squares would give: most digits of the variance lost
    n = x[:, 0].numel()
    naive = (x.square().sum((0, 2, 3)) / n) - (x.sum((0, 2, 3)) / n).square()
    assert float(((naive - ref_var) / ref_var).abs().max()) > 1e-7


def test_stale_across_ranks_sees_the_other_ranks_chunks_as_of_the_step_start(two_ranks):
    """Stale aggregation is sequential over chunks; across ranks a chunk sees its own rank's earlier
    chunks refreshed this step and the other ranks' chunks as they were when the step began. Rank 0's
    chunks come first, so after one step they equal one process's; rank 1's differ, and still learn."""
    results = two_ranks[1]
    one, _ = zsq_fast.generate(tiny(), N, "dgh", SIZE, **dict(STALE, iterations=1))
    r0, r1 = (r["images"] for r in results["stale_1"])
    torch.testing.assert_close(r0, one[:r0.shape[0]], rtol=0, atol=ATOL)
    assert float((r1 - one[r0.shape[0]:]).abs().max()) > 20 * ATOL  # it saw staler statistics
    one, rec_one = zsq_fast.generate(tiny(), N, "dgh", SIZE, **dict(STALE, iterations=8, lr=1.0))
    rec = results["stale_8"][0]["record"]
    assert rec["final_bn_loss"] < 0.97 * rec["initial_bn_loss"]  # one process: 7.31 -> 6.89
    assert rec["final_bn_loss"] == pytest.approx(rec_one.final_bn_loss, rel=0.01)


def test_too_many_ranks_for_the_chunks_is_one_clear_error(two_ranks):
    errors = two_ranks[1]["too_few_chunks"]
    assert all(e.startswith("InvalidArgumentError: 2 ranks need at least 2 chunks, the set has 1") for e in errors), \
        errors


def test_a_bad_checkpoint_of_one_rank_ends_every_rank_at_once(two_ranks):
    """Rank 1 cannot read its checkpoint file: it raises its own error, rank 0 one line naming rank 1, both
    before any step (waiting for rank 1 in a collective would have ended in a DistributedError, exit 3)."""
    r0, r1 = two_ranks[1]["bad_checkpoint"]
    assert r1.startswith("FileFormatError: ") and "rank-00001.pt" in r1, r1
    assert r0.startswith("InvalidArgumentError: reading the checkpoints failed on rank 1: "), r0


def test_sharded_checkpoint_folder_and_load_images(two_ranks):
    ck = two_ranks[0] / "ck"
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["n_images"] == N
    assert [r["path"] for r in manifest["shards"]] == ["rank-00000", "rank-00001"]
    whole = zsq_fast.load_images(ck)
    assert torch.equal(whole, _whole(two_ranks[1]["disk"]))
    one, _ = zsq_fast.generate(tiny(), N, "dgh", SIZE, **COMMON)
    torch.testing.assert_close(whole, one, rtol=0, atol=ATOL)
    # the same folder under another world size is refused with one line
    with pytest.raises(zsq_fast.errors.InvalidArgumentError, match="on 2 ranks, this run .* on 3 ranks"):
        sharded_run.prepare_checkpoint(ck, plan([slice(0, 3), slice(3, 6), slice(6, 7)], N, 0, 3), disk=True)


@pytest.mark.parametrize("store,when", [("host", ""), ("disk", ""), ("disk", ":commit")])
def test_a_killed_rank_is_named_and_the_rerun_resumes_exactly(tmp_path, store, when):
    """when=':commit': rank 1 dies after step 4's last collective, before committing it, so rank 0's run
    folder is one step ahead (it committed step 4); the rerun steps it back to step 3."""
    kw = dict(COMMON, iterations=6, checkpoint_every=2, store=store, checkpoint=str(tmp_path / "ck"))
    t0 = time.monotonic()
    codes, results = run_ranks(tmp_path / "killed", [("run", "dgh", kw)],
                               env={"ZSQ_FAST_TEST_EXIT": "1:4" + when, "ZSQ_FAST_DIST_TIMEOUT": "20"})
    assert time.monotonic() - t0 < 90
    assert codes == [3, 17], (codes, results)
    err = results["run"][0]
    failed = "generation step 5: rank 1 (last began step 4)" if when else "generation step 4: rank 1 (last began step 3)"
    assert err.startswith(f"DistributedError: {failed} died"), err
    # the same command again resumes (rank 0 rolls back / both take the last step they all saved), and an
    # uninterrupted run in another folder gives the same images
    codes, results = run_ranks(tmp_path / "rerun", [("run", "dgh", kw),
                                                    ("ref", "dgh", dict(kw, checkpoint=str(tmp_path / "ref")))])
    assert codes == [0, 0], results
    assert [r["record"]["resumed_from_step"] for r in results["run"]] == [2 if store == "host" else 3] * 2
    assert torch.equal(_whole(results["run"]), _whole(results["ref"]))


def test_cli_generate_under_torchrun_writes_shards_that_load_as_one_set(tmp_path):
    """`torchrun --nproc_per_node=2 -m zsq_fast generate ...`: each rank writes its shard, rank 0 the
    manifest and the report; load_images reads the shards as the one-process CLI's images."""
    import subprocess
    import sys

    from conftest import REPO, write_tiny_digits
    from zsq_fast.cli import main

    d = write_tiny_digits(tmp_path, 10)
    args = ["generate", "--model", "digits_cnn", "--weights", str(d / "w.pt"), "--no-progress", "--device", "cpu",
            "-n", "10", "--iterations", "3", "--chunk-size", "4", "--seed", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "zsq_fast", *args, "--out", str(tmp_path / "two.pt")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote 10 dgh images (16x16)") == 1 and "in 2 shards" in r.stdout, r.stdout
    assert sorted(os.listdir(tmp_path / "two.pt")) == ["manifest.json", "rank-00000.pt", "rank-00001.pt"]
    report = json.loads((tmp_path / "two.report.json").read_text())
    assert report["settings"]["world_size"] == 2
    assert report["generation"]["dgh"]["shard"] == {"rank": 0, "world_size": 2, "start": 0, "stop": 8, "n_images": 10}
    assert main([*args, "--out", str(tmp_path / "one.pt")]) == 0
    two, one = zsq_fast.load_images(tmp_path / "two.pt"), zsq_fast.load_images(tmp_path / "one.pt")
    torch.testing.assert_close(two, one, rtol=0, atol=ATOL)
    # quantize --images reads the shards as one set too (lazily, any order of indices)
    from zsq_fast.data import load_images_for

    data = load_images_for(str(tmp_path / "two.pt"), [0.305] * 3, [0.319] * 3, 16)  # digits_cnn's normalization
    assert data.n == 10 and data.source.startswith("2 shards")
    idx = torch.tensor([9, 0, 7, 8, 3])
    assert torch.equal(data.take(idx)[0], two[idx])


def _manifest(folder, rows, n):
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "kind": "images", "world_size": len(rows),
                                                      "n_images": n, "shards": rows}))


def test_png_shards_load_as_one_set_and_bad_manifests_are_one_line(tmp_path):
    """A PNG output of two ranks (one folder each) reads back in global order, with labels, through
    load_images and the calibration-data reader alike; a manifest that does not cover the set once is refused."""
    from zsq_fast.data import load_images_for
    from zsq_fast.generate import save_images

    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    y = torch.tensor([3, 1, 4, 1, 5])
    kw = dict(mean=[0.5] * 3, std=[0.5] * 3)
    save_images(x[3:], tmp_path / "rank-00001", labels=y[3:], **kw)  # written in any order
    save_images(x[:3], tmp_path / "rank-00000", labels=y[:3], **kw)
    rows = [{"rank": 1, "start": 3, "stop": 5, "path": "rank-00001"}, {"rank": 0, "start": 0, "stop": 3,
                                                                       "path": "rank-00000"}]
    _manifest(tmp_path, rows, 5)
    images, labels = zsq_fast.load_images(tmp_path, with_labels=True, **kw)
    torch.testing.assert_close(images, x, rtol=0, atol=1 / 255 / 0.5)  # 8-bit PNG pixels
    assert torch.equal(labels, y)
    data = load_images_for(str(tmp_path), [0.5] * 3, [0.5] * 3, 4)
    assert data.n == 5 and torch.equal(data.labels, y)
    assert torch.equal(data.take(range(5))[0], images)
    for bad in ([rows[0], {**rows[1], "stop": 2}], [rows[0]], [rows[0], {**rows[1], "rank": 1}]):
        _manifest(tmp_path, bad, 5)
        with pytest.raises(zsq_fast.errors.FileFormatError, match="not a zsq_fast shard manifest"):
            zsq_fast.load_images(tmp_path)
    # a manifest that covers 4 images once, but rank 0's folder holds 3, not 2
    _manifest(tmp_path, [{**rows[1], "stop": 2}, {**rows[0], "start": 2, "stop": 4}], 4)
    with pytest.raises(zsq_fast.errors.FileFormatError, match="rank-00000 holds 3 images, the manifest says 2"):
        zsq_fast.load_images(tmp_path)
    with pytest.raises(zsq_fast.errors.FileFormatError, match="rank-00000 holds 3 images, the manifest says 2"):
        load_images_for(str(tmp_path), [0.5] * 3, [0.5] * 3, 4)
