"""The run report and run settings behind every CLI command."""
import json

import numpy as np
import pytest
import torch

from zsq_fast.cli import Progress, parse_bits
from zsq_fast.report import LossLog, RunReport, jsonable, report_path_for, resolve_device


def test_loss_log_subsamples_and_keeps_lists_aligned():
    log = LossLog(total=100, max_points=10)
    for step in range(100):
        log.add(step, {"bn": float(step), "unit": "layer1"} if step < 50 else {"loss": 1.0}, total=100)
    d = log.to_dict()
    assert d["steps"] == list(range(0, 100, 10)) + [99]
    assert len(d["bn"]) == len(d["loss"]) == len(d["steps"]) and "unit" not in d
    assert d["bn"][:5] == [0.0, 10.0, 20.0, 30.0, 40.0] and d["bn"][5] is None and d["loss"][0] is None


def test_progress_adapter_ignores_stage_notices_and_logs_numbers():
    p = Progress("t", enabled=False)
    p(0, 0, {"stage": "calibrated"})
    for step in range(1, 5):
        p(step, 4, {"stage": "reconstruct", "unit": "b", "loss": 1.0 / step})
    p.close()
    assert p.losses()["loss"][-1] == 0.25


def test_report_json_and_paths(tmp_path):
    r = RunReport("x", {"dev": torch.device("cpu"), "arr": np.arange(2), "t": torch.tensor(1.5)})
    with r.timed("phase"):
        pass
    path = r.write(str(tmp_path / "sub" / "r.json"))
    d = json.loads(open(path).read())
    assert d["settings"] == {"dev": "cpu", "arr": [0, 1], "t": 1.5}
    assert "phase" in d["timings_s"] and d["peak_memory"]["process_peak_rss_mib"] > 0
    assert d["environment"]["torch"] == torch.__version__
    assert report_path_for("out/images.pt") == "out/images.report.json"
    (tmp_path / "pngs").mkdir()
    assert report_path_for(str(tmp_path / "pngs") + "/") == str(tmp_path / "pngs") + ".report.json"
    assert jsonable(float("nan")) is None


def test_run_settings_validation():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert parse_bits("w3a8") == (3, 8)
    for bad in ("W1A4", "W4A17", "W4", "4/4"):
        with pytest.raises(ValueError, match="bad bits"):
            parse_bits(bad)
