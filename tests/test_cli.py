"""`zsq-fast` end to end on a tiny model (16x16 digits CNN, random weights) and every bad-input path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import write_tiny_digits

from zsq_fast.cli import main
from zsq_fast.models.zoo import ZOO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A digits_cnn state dict with BN statistics from a few forward passes, and a small labelled npz."""
    d = tmp_path_factory.mktemp("tiny")
    return write_tiny_digits(d, 24)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _model(tiny):
    return ["--model", "digits_cnn", "--weights", tiny / "w.pt", "--no-progress"]


def test_generate_quantize_eval_end_to_end(tiny, tmp_path, capsys):
    imgs = tmp_path / "imgs.pt"
    code, out, err = _run(capsys, "generate", *_model(tiny), "--method", "dgh", "-n", 8, "--iterations", 2,
                          "--chunk-size", 4, "--out", imgs, "--seed", 1)
    assert code == 0, err
    assert "wrote 8 dgh images (16x16)" in out
    rep = json.loads((tmp_path / "imgs.report.json").read_text())
    assert rep["command"] == "generate" and rep["settings"]["seed"] == 1
    assert rep["settings"]["model"]["source"] == "zoo:digits_cnn"
    assert "generate_dgh" in rep["timings_s"] and rep["peak_memory"]["process_peak_rss_mib"] > 0
    assert len(rep["generation"]["dgh"]["losses"]) == 2  # per-step losses of the generator's record

    q = tmp_path / "q.pt"
    code, out, err = _run(capsys, "quantize", *_model(tiny), "--images", imgs, "--bits", "W4A8", "--method",
                          "nearest", "--out", q, "--eval", tiny / "data.npz", "--onnx", tmp_path / "q.onnx")
    assert code == 0, err
    assert "quantized: top1" in out and q.exists() and (tmp_path / "q.onnx").stat().st_size > 1000
    rep = json.loads((tmp_path / "q.report.json").read_text())
    assert rep["quant_config"]["nearest"]["bits"] == "W4A8"
    assert rep["metrics"]["float"]["agreement"] == 100.0 and rep["metrics"]["data"]["n"] == 24
    in_run = rep["metrics"]["quantized"]

    code, out, err = _run(capsys, "eval", *_model(tiny), "--quantized", q, "--data", tiny / "data.npz",
                          "--report", tmp_path / "e.json")
    assert code == 0, err
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["metrics"]["quantized"] == in_run  # the saved model reloads to the same predictions
    assert set(rep["metrics"]["float"]) == {"n", "top1", "top5", "agreement"}


def test_quantize_with_a_generator_and_pngs(tiny, tmp_path, capsys):
    pngs = tmp_path / "pngs"
    code, _, err = _run(capsys, "generate", *_model(tiny), "--method", "bns", "-n", 4, "--iterations", 1,
                        "--out", pngs)
    assert code == 0, err
    assert len(list(pngs.glob("*.png"))) == 4 and (tmp_path / "pngs.report.json").exists()
    code, out, err = _run(capsys, "quantize", *_model(tiny), "--generator", "bns", "-n", 4,
                          "--gen-iterations", 1, "--method", "brecq", "--iterations", 2, "--batch-size", 4,
                          "--preset", "academic", "--out", tmp_path / "q.pt")
    assert code == 0, err
    rep = json.loads((tmp_path / "q.report.json").read_text())
    assert rep["settings"]["calibration"] == {"source": "generator bns", "n": 4}
    assert {"generate_bns", "quantize_brecq"} <= set(rep["timings_s"])
    assert rep["losses"]["quantize_brecq"]["loss"]  # reconstruction losses from the progress callback


def test_reconstruction_flags_reach_the_reconstruction(tiny, tmp_path, capsys):
    data = tiny / "data.npz"
    code, _, err = _run(capsys, "quantize", *_model(tiny), "--images", data, "--method", "brecq", "--iterations", 3,
                        "--batch-size", 4, "--lr", "0.02", "--act-lr", "0.005", "--reg-weight", "0.1", "--qdrop",
                        "--input-bits", 6, "--out", tmp_path / "q.pt")
    assert code == 0, err
    cfg = json.loads((tmp_path / "q.report.json").read_text())["quant_config"]["brecq"]
    assert cfg["input_bits"] == 6
    rec = cfg["reconstruction"]
    assert (rec["iterations"], rec["lr"], rec["act_lr"], rec["reg_weight"], rec["qdrop"]) == (3, 0.02, 0.005, 0.1, 0.5)
    # without the flags: the defaults for the count (BRECQ's rates x 20000 / iterations, capped at 100x)
    code, _, err = _run(capsys, "quantize", *_model(tiny), "--images", data, "--method", "adaround", "--iterations",
                        2000 // 100, "--batch-size", 4, "--qdrop", "0.25", "--out", tmp_path / "q2.pt")
    assert code == 0, err
    rec = json.loads((tmp_path / "q2.report.json").read_text())["quant_config"]["adaround"]["reconstruction"]
    assert rec["lr"] == pytest.approx(0.1) and rec["act_lr"] == pytest.approx(0.04) and rec["qdrop"] == 0.25
    assert rec["reg_weight"] == 0.01
    for argv, expected in ((["--lr", "0"], "expected a positive number"), (["--act-lr", "-1"], "positive number"),
                           (["--reg-weight", "x"], "non-negative number"), (["--qdrop", "1"], "probability"),
                           (["--method", "nearest", "--lr", "0.1"], "--method nearest has none"),
                           (["--method", "nearest", "--input-bits", "17"], "input_bits must be")):
        code, _, err = _run(capsys, "quantize", *_model(tiny), "--images", data, *argv, "--out", tmp_path / "e.pt")
        assert code == 2 and expected in _one_error_line(err), (argv, err)


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsq-fast"), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    (tmp_path / "nobn.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))\n"
        "    m.input_size = 16\n"
        "    return m\n")
    sys.path.insert(0, str(tmp_path))
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 16, 16, 3), np.uint8))
    wrong = tmp_path / "wrong.pt"
    torch.save(ZOO["resnet20"].factory().state_dict(), wrong)
    out_q = ["--out", tmp_path / "q.pt"]
    cases = {
        "missing file": (["eval", "--model", "digits_cnn", "--weights", tmp_path / "nope.pt", "--data",
                          tiny / "data.npz"], "weights file not found"),
        "missing data": (["eval", *_model(tiny), "--data", tmp_path / "nope.npz"], "data not found"),
        "state dict does not fit": (["eval", "--model", "digits_cnn", "--weights", wrong, "--data",
                                     tiny / "data.npz"], "do not fit architecture digits_cnn"),
        "no BN for a BN generator": (["generate", "--model", "nobn:make", "--out", tmp_path / "i.pt"],
                                     "has no BatchNorm layers"),
        "no BN, quantize": (["quantize", "--model", "nobn:make", "--generator", "dgh", *out_q],
                            "has no BatchNorm layers"),
        "unknown generator": (["quantize", *_model(tiny), "--generator", "gan", *out_q],
                              "invalid choice: 'gan'"),
        "unknown preset": (["quantize", *_model(tiny), "--images", tiny / "data.npz", "--preset", "fast",
                            *out_q], "invalid choice: 'fast'"),
        "bits W0A4": (["quantize", *_model(tiny), "--images", tiny / "data.npz", "--bits", "W0A4", *out_q],
                      "bad bits 'W0A4'"),
        "bits garbage": (["quantize", *_model(tiny), "--images", tiny / "data.npz", "--bits", "4bit", *out_q],
                         "bad bits '4bit'"),
        "npz without x": (["eval", *_model(tiny), "--data", tmp_path / "nox.npz"], "has no array 'x'"),
        "no calibration source": (["quantize", *_model(tiny), *out_q], "either --images DATA or --generator"),
        "fdda without real": (["generate", *_model(tiny), "--method", "fdda", "--out", tmp_path / "i.pt"],
                              "needs real labelled images"),
        "unknown model": (["eval", "--model", "resnet21", "--data", tiny / "data.npz"], "unknown model"),
        "not a quantized file": (["eval", *_model(tiny), "--quantized", tiny / "data.npz", "--data",
                                  tiny / "data.npz"], "quantized model"),
        "unknown precision": (["eval", *_model(tiny), "--data", tiny / "data.npz", "--precision", "fp8"],
                              "unknown precision 'fp8'"),
        "missing output folder": (["generate", *_model(tiny), "--out", tmp_path / "no" / "dir" / "i.pt"],
                                  "output folder does not exist"),
        "no subcommand": ([], "required"),
    }
    try:
        for name, (argv, expected) in cases.items():
            code, _, err = _run(capsys, *argv)
            assert code == 2, name
            assert expected in _one_error_line(err), (name, err)
    finally:
        sys.path.remove(str(tmp_path))


def test_python_dash_m_exit_code_and_stderr(tmp_path):
    np.savez(tmp_path / "nox.npz", images=np.zeros((1, 4, 4, 3), np.uint8))
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "zsq_fast", "eval", "--model", "resnet20",
                        "--data", str(tmp_path / "nox.npz")], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("zsq-fast: error:") and "Traceback" not in r.stderr


def test_cli_on_real_cifar_resnet20(shared_data, tmp_path, capsys):
    w = shared_data / "weights" / "cifar10_resnet20.pt"
    code, out, err = _run(capsys, "eval", "--model", "resnet20", "--weights", w, "--data",
                          shared_data / "cifar10_test_exact1017.npz", "--limit", 200, "--no-progress",
                          "--report", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["float"]["top1"] > 85


def test_generate_with_a_disk_store_bf16_and_channels_last(tiny, tmp_path, capsys):
    imgs, folder = tmp_path / "imgs.pt", tmp_path / "run"
    argv = ["generate", *_model(tiny), "-n", 6, "--iterations", 2, "--chunk-size", 4, "--checkpoint-every", 3,
            "--out", imgs, "--store", "disk", "--checkpoint", folder, "--precision", "bf16", "--channels-last"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    rep = json.loads((tmp_path / "imgs.report.json").read_text())
    record = rep["generation"]["dgh"]
    assert record["store"] == {"kind": "disk", "reason": "requested", "folder": str(folder)}
    assert record["settings"]["amp"] == "bf16" and record["settings"]["channels_last"] is True
    assert record["settings"]["checkpoint_every"] == 3
    assert torch.load(imgs, weights_only=True)["images"].shape == (6, 3, 16, 16)
    assert (folder / "state.pt").exists()
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, *argv[:-7], "--store", "disk", "--checkpoint", tmp_path / "afile")
    assert code == 2 and "is a file" in _one_error_line(err)
