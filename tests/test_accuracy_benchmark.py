"""benchmarks/accuracy.py: the full setting is the issue's, and its smallest setting runs end to end."""
import json

import torch

from conftest import load_benchmark


def _accuracy():
    return load_benchmark("accuracy")


def test_full_setting_and_plan_are_the_issues():
    acc = _accuracy()
    cpu = acc.resolve_settings(acc.parse_args(["--setting", "full"]), torch.device("cpu"))
    assert (cpu["n_images"], cpu["gen_iterations"], cpu["recon_iterations"]) == (256, 500, 2000)
    assert cpu["seeds"] == [0, 1, 2]
    gpu = acc.resolve_settings(acc.parse_args(["--full"]), torch.device("cuda"))
    assert (gpu["n_images"], gpu["gen_iterations"], gpu["recon_iterations"]) == (1024, 1000, 20000)
    assert gpu["recon_lr"] == 1e-3
    cells = acc.plan(cpu)
    # every row at W4A4 hw; real and dgh also at W3A8, W8A8, W2A4; real and dgh with 3 seeds
    assert {(r, c) for r, c, _ in cells if c == "W4A4:hw"} == {(r, "W4A4:hw") for r in acc.ROWS}
    assert {c for r, c, _ in cells if r in ("real", "dgh_exact")} == {"W4A4:hw", "W3A8:hw", "W8A8:hw", "W2A4:hw"}
    assert {c for r, c, _ in cells if r in ("bns", "fdda", "dgh_stale")} == {"W4A4:hw"}
    assert sorted(s for r, c, s in cells if r == "real" and c == "W4A4:hw") == [0, 1, 2]
    assert [s for r, c, s in cells if r == "fdda"] == [0]
    assert len(cells) == len(set(cells)) == 4 * 3 * 2 + 3 + 1 + 1


def test_smoke_setting_runs_and_writes_the_table(shared_data, tmp_path):
    acc = _accuracy()
    out = tmp_path / "acc.md"
    n = torch.get_num_threads()
    try:
        code = acc.main(["--setting", "smoke", "--models", "resnet20", "--rows", "real,dgh_exact,fdda",
                         "--extra-columns", "W8A8:hw", "--eval-limit", "50", "--agreement-limit", "50",
                         "--data", str(shared_data), "--out", str(out), "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    md = out.read_text()
    assert "| real data (train images) | 2 |" in md and " ± " in md and "dgh (exact) − real at W4A4:hw" in md
    assert "| fdda (1 real image/class) | 1 |" in md and "Setting `smoke`" in md
    res = json.loads(out.with_suffix(".json").read_text())["metrics"]["resnet20"]
    assert len(res["cells"]) == 2 * 2 + 2 * 2 + 1
    assert all(c["cell_s"] > 0 and 0 <= c["top1"] <= 100 and c["unit_losses"] for c in res["cells"])
    assert set(res["calibration_s"]) == {"real|0", "real|1", "dgh_exact|0", "dgh_exact|1", "fdda|0"}
    # generators record their final whole-set BN loss (the bf16-vs-fp32 comparison reads it); real data has none
    assert set(res["final_bn_loss"]) == {"dgh_exact|0", "dgh_exact|1", "fdda|0"}
    assert all(v > 0 for v in res["final_bn_loss"].values())


def _spy_and_run(acc, monkeypatch, name, record, args, data, out):
    """Run accuracy.main(smoke + args) with acc.<name> wrapped so that record(kwargs) sees each call."""
    real = getattr(acc, name)

    def spy(*a, **kwargs):
        record(kwargs)
        return real(*a, **kwargs)

    monkeypatch.setattr(acc, name, spy)
    n = torch.get_num_threads()
    try:
        acc.main(["--setting", "smoke", "--models", "resnet20", "--seeds", "0", "--extra-columns", "",
                  "--eval-limit", "20", "--agreement-limit", "20", "--data", str(data), "--out", str(out),
                  "--no-progress", "--threads", "1", *args])
    finally:
        torch.set_num_threads(n)


def test_generation_precision_is_applied_and_labelled(shared_data, tmp_path, monkeypatch):
    acc = _accuracy()
    seen = {}
    out = tmp_path / "acc.md"
    _spy_and_run(acc, monkeypatch, "run_generate",
                 lambda kw: seen.update(precision=kw["precision"], channels_last=kw["channels_last"]),
                 ["--rows", "dgh_exact", "--gen-precision", "bf16", "--channels-last"], shared_data, out)
    assert seen == {"precision": "bf16", "channels_last": True}
    assert "generation iterations (bf16 autocast, channels_last)" in out.read_text()


def test_qdrop_reaches_quantize_and_is_labelled(shared_data, tmp_path, monkeypatch):
    acc = _accuracy()
    seen = []
    out = tmp_path / "acc.md"
    _spy_and_run(acc, monkeypatch, "run_quantize", lambda kw: seen.append(kw["extra"]["qdrop"]),
                 ["--rows", "real", "--qdrop", "0.5"], shared_data, out)
    assert seen == [0.5]
    assert "batch 32, QDrop p = 0.5)" in out.read_text()
    assert acc.resolve_settings(acc.parse_args([]), torch.device("cpu"))["qdrop"] == 0.0
