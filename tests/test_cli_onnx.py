"""`zsq-fast quantize --onnx` records, and `zsq-fast eval --onnx` measures, the export run by onnxruntime."""
import json

import pytest
from conftest import write_tiny_digits
from test_cli import _model, _run


pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """digits_cnn weights with BN statistics from a few batches, and a small labelled npz."""
    d = tmp_path_factory.mktemp("tiny_onnx")
    return write_tiny_digits(d, 40)


def test_quantize_onnx_records_agreement_and_eval_onnx_reproduces_it(tiny, tmp_path, capsys):
    q, qx = tmp_path / "q.pt", tmp_path / "q.onnx"
    code, out, err = _run(capsys, "quantize", *_model(tiny), "--images", tiny / "data.npz", "--bits", "W4A4",
                          "--method", "nearest", "--out", q, "--onnx", qx, "--eval", tiny / "data.npz")
    assert code == 0, err
    assert "argmax agreement with the fake-quant model 100.00%" in out
    m = json.loads((tmp_path / "q.report.json").read_text())["metrics"]
    assert m["onnx"]["agreement"] == 100.0 and m["onnx"]["max_logit_diff_steps"] <= 1.0
    assert m["onnx"]["top1"] == m["quantized"]["top1"] and m["onnx"]["data"]["n"] == 40
    assert "default session options" in m["onnx"]["runtime"]

    code, out, err = _run(capsys, "eval", *_model(tiny), "--quantized", q, "--onnx", qx, "--data",
                          tiny / "data.npz", "--report", tmp_path / "e.json")
    assert code == 0, err
    e = json.loads((tmp_path / "e.json").read_text())["metrics"]["onnx"]
    assert {k: e[k] for k in ("top1", "agreement", "n")} == {k: m["onnx"][k] for k in ("top1", "agreement", "n")}


def test_quantize_onnx_without_eval_data_uses_the_calibration_images(tiny, tmp_path, capsys):
    code, out, err = _run(capsys, "quantize", *_model(tiny), "--images", tiny / "data.npz", "--bits", "W8A8",
                          "--method", "nearest", "--out", tmp_path / "q.pt", "--onnx", tmp_path / "q.onnx")
    assert code == 0, err
    r = json.loads((tmp_path / "q.report.json").read_text())["metrics"]["onnx"]
    assert r["data"] == {"source": "calibration images", "n": 40} and r["agreement"] == 100.0
    assert "top1" not in r


def test_onnx_int8_choice_sets_the_session_option_and_skips_the_second_pass(tiny, tmp_path, capsys, monkeypatch):
    """--onnx-int8 exact / plain: one pass with or without the exact-int8 option; auto on a CPU that saturates
    (simulated) adds the plain options' pass."""
    import zsq_fast.onnx_eval as onnx_eval
    q, qx = tmp_path / "q.pt", tmp_path / "q.onnx"
    code, _, err = _run(capsys, "quantize", *_model(tiny), "--images", tiny / "data.npz", "--bits", "W8A8",
                        "--method", "nearest", "--out", q, "--onnx", qx, "--onnx-int8", "plain")
    assert code == 0, err
    assert onnx_eval.EXACT_INT8[0] not in json.loads((tmp_path / "q.report.json").read_text())["metrics"]["onnx"][
        "runtime"]
    monkeypatch.setattr(onnx_eval, "int8_saturates", lambda: True)
    got = {}
    for choice in ("exact", "plain", "auto"):
        report = tmp_path / f"{choice}.json"
        code, out, err = _run(capsys, "eval", *_model(tiny), "--quantized", q, "--onnx", qx, "--data",
                              tiny / "data.npz", "--onnx-int8", choice, "--report", report)
        assert code == 0, err
        got[choice] = json.loads(report.read_text())["metrics"]["onnx"]
        assert ("without that option on this CPU" in out) == (choice == "auto"), out
    assert onnx_eval.EXACT_INT8[0] in got["exact"]["runtime"] and "asked for" in got["exact"]["runtime"]
    assert onnx_eval.EXACT_INT8[0] not in got["plain"]["runtime"]
    assert "no VNNI" in got["auto"]["runtime"] and "default_options" in got["auto"]
    assert "default_options" not in got["exact"] and "default_options" not in got["plain"]
    assert got["auto"]["agreement"] == got["exact"]["agreement"]
    assert got["auto"]["default_options"]["agreement"] == got["plain"]["agreement"]
    code, _, err = _run(capsys, "eval", *_model(tiny), "--quantized", q, "--data", tiny / "data.npz",
                        "--onnx-int8", "exact")  # without --onnx: nothing to choose kernels for
    assert code == 2 and len(err.strip().splitlines()) == 1 and "give --onnx too" in err, err


def test_eval_onnx_bad_file_is_one_error_line(tiny, tmp_path, capsys):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    for path, expected in ((tmp_path / "bad.onnx", "onnxruntime cannot load"),
                           (tmp_path / "missing.onnx", "ONNX model not found")):
        code, _, err = _run(capsys, "eval", *_model(tiny), "--onnx", path, "--data", tiny / "data.npz")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
