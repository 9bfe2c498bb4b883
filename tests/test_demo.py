"""The demo's pieces on a reduced setting: the embedded data, the training, the table and the image sheet."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from zsq_fast.demo import DemoSettings, format_table, run_demo  # noqa: E402
from zsq_fast.demo.digits import load_digits_split, train_digits_cnn  # noqa: E402
from zsq_fast.demo.grid import image_grid, save_comparison  # noqa: E402
from zsq_fast.demo.run import Row  # noqa: E402
from zsq_fast.evaluate import evaluate  # noqa: E402


def test_digits_split_is_seeded_and_disjoint():
    a, b = load_digits_split(seed=0), load_digits_split(seed=0)
    assert np.array_equal(a.test_x, b.test_x) and a.train_x.shape == (1258, 16, 16, 1)
    assert a.test_x.shape[0] == 539 and a.train_x.dtype == np.uint8
    train = {x.tobytes() for x in a.train_x}
    assert sum(x.tobytes() in train for x in a.test_x) < 5  # load_digits has a few duplicate images
    assert set(np.unique(a.test_y)) == set(range(10))


def test_training_is_deterministic_and_learns():
    split = load_digits_split(seed=0)
    m1, losses = train_digits_cnn(split, epochs=2, seed=3, progress=False)
    m2, _ = train_digits_cnn(split, epochs=2, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert losses[1] < losses[0] < 2.4
    assert evaluate(m1, split.test())["top1"] > 60  # chance is 10 %


def test_table_and_grid(tmp_path):
    rows = [Row("float32", "-", {"W4A4": (99.5, 100.0), "W2A4": (99.5, 100.0)}),
            Row("BRECQ", "DGH synthetic (8)", {"W4A4": (97.25, 98.0), "W2A4": (50.0, 51.125)})]
    t = format_table(rows, ("W4A4", "W2A4"), "hw", 539)
    assert "| model | calibration images | W4A4 hw | W2A4 hw |" in t
    assert "| BRECQ | DGH synthetic (8) | 97.25 / 98.00 | 50.00 / 51.12 |" in t and "539 held-out" in t
    imgs = np.zeros((5, 2, 3, 3), np.uint8)
    imgs[1] = 255
    g = image_grid(imgs, cols=3, scale=2, pad=1)
    assert g.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3)
    assert (g[1:5, 8:14] == 255).all() and (g[1:5, 1:7] == 0).all()
    p = save_comparison([("a", imgs), ("b", imgs[:2])], str(tmp_path / "s.png"), cols=3)
    assert Image.open(p).size[0] == 3 * (3 * 4 + 2) + 2


def test_run_demo_reduced(tmp_path):
    lines = []
    s = DemoSettings(epochs=1, n_images=16, gen_iterations=2, recon_iterations=2, bits=("W4A4",))
    out = run_demo(str(tmp_path), settings=s, progress=False, echo=lines.append)
    names = [(r.name, r.calibration.split(" (")[0]) for r in out["rows"]]
    assert names == [("float32", "-"), ("round-to-nearest", "DGH synthetic"), ("BRECQ", "Gaussian noise"),
                     ("BRECQ", "DGH synthetic"), ("BRECQ", "real training images")]
    assert all(0 <= r.cells["W4A4"][0] <= 100 and 0 <= r.cells["W4A4"][1] <= 100 for r in out["rows"])
    assert out["table"] in "\n".join(lines) and (tmp_path / "table.md").read_text().startswith(out["table"])
    assert Image.open(out["grid"]).size[0] > 100
    rep = json.loads((tmp_path / "demo.report.json").read_text())
    assert rep["settings"]["epochs"] == 1 and len(rep["metrics"]["rows"]) == 5
    assert "generate_dgh" in rep["timings_s"] and rep["generation"]["dgh"]["settings"]["n_images"] == 16
    assert "quantize_W4A4_brecq_real" in rep["timings_s"]
