"""benchmarks/scale.py: the smoke grid runs end to end, and host and disk stores give the same run."""

import torch

from conftest import load_benchmark


def _scale():
    return load_benchmark("scale")


def test_cpu_grid_is_the_issues():
    scale = _scale()
    cfgs = scale.plan("cpu", None, 2, 256, 1, None)
    assert {(c["model"], c["n"]) for c in cfgs} == {("digits_cnn", 10**k) for k in (3, 4, 5, 6)} | {
        ("resnet20", 10**k) for k in (3, 4, 5)}
    assert {(c["mode"], c["store"]) for c in cfgs} == {(m, s) for m in ("exact", "stale") for s in ("host", "disk")}
    assert max(c["n"] for c in scale.plan("cpu", 10**4, 2, 256, 1, None)) == 10**4


def test_smoke_grid_runs(tmp_path):
    threads = torch.get_num_threads()
    try:
        text = _scale().main(["--grid", "smoke", "--in-process", "--chunk", "32", "--iterations", "1",
                              "--folder", str(tmp_path), "--out", str(tmp_path / "scale.md")])
    finally:
        torch.set_num_threads(threads)
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| digits_cnn")]
    assert len(rows) == 8 and not any("failed" in "".join(r) for r in rows)
    assert all(float(r[6]) > 0 and float(r[7]) > 0 for r in rows)
    loss = {(r[2].strip(), r[3].strip(), r[4].strip()): r[10].strip() for r in rows}
    for n in ("32", "96"):
        for mode in ("exact", "stale"):
            assert loss[(n, mode, "host")] == loss[(n, mode, "disk")]  # same seed, same run
    assert (tmp_path / "scale.md").read_text().strip() == text.strip()
    assert list(tmp_path.iterdir()) == [tmp_path / "scale.md"]  # run folders removed


def test_stale_bookkeeping_table():
    text = _scale().stale_bookkeeping(chunk_counts=(3, 6), channels=(2, 4), max_old=3)
    rows = [line.split("|")[1:-1] for line in text.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["3", "6"]
    assert float(rows[0][2]) >= 0 and rows[1][2].strip() == "not run"
