"""Run pictures (zsq_fast.plots and the CLI's PNGs beside the reports): they exist, are readable and
show the run's data; a failing plot never fails the run."""
import json

import numpy as np
import pytest
from PIL import Image

import zsq_fast
from test_cli import _model, _run, tiny  # noqa: F401 - the tiny fixture
from test_generate import tiny as tiny_net
from zsq_fast import plots
from zsq_fast.generate.losses import layer_groups


def _colored_fraction(img: Image.Image, box) -> float:
    """Share of pixels in box that are neither white/grey nor black: drawn curves or images."""
    a = np.asarray(img.crop(box).convert("RGB")).astype(int)
    spread = a.max(2) - a.min(2)
    return float((spread > 40).mean())


def test_line_panel_draws_lines_and_copes_with_bad_values():
    p = plots.line_panel({"a": ([1, 2, 3], [1.0, 0.1, 0.01]), "b": ([1, 2, 3], [None, float("nan"), 0.5])},
                         "t", log_y=True)
    assert p.size == plots.PANEL and _colored_fraction(p, (70, 40, 400, 215)) > 0.003
    empty = plots.line_panel({"a": ([1], [-1.0])}, "t", log_y=True, note="ODSL off")  # nothing positive
    assert _colored_fraction(empty, (0, 0, *plots.PANEL)) == 0.0
    flat = plots.line_panel({"lr": ([1, 2], [16.0, 16.0])}, "lr", log_y=True)  # constant: still a line
    assert _colored_fraction(flat, (70, 40, 400, 215)) > 0.001


def test_layer_groups_cover_every_layer_once():
    for n in (1, 2, 3, 4, 20, 58):
        idx = [i for r in layer_groups(n).values() for i in r]
        assert idx == list(range(n))
    assert list(layer_groups(4)) == ["input", "early", "mid", "late"]


def test_generation_losses_per_layer_group_sum_to_the_bn_loss():
    for kw in ({"aggregation": "exact"}, {"aggregation": "stale"}):
        _, rec = zsq_fast.generate(tiny_net(), 6, "dgh", 8, iterations=2, chunk_size=3, **kw)
        for h in rec.losses:
            groups = [h[k] for k in ("bn_input", "bn_early", "bn_mid", "bn_late")]
            assert sum(groups) == pytest.approx(h["bn"], rel=1e-6)
    _, rec = zsq_fast.generate(tiny_net(), 6, "bns", 8, iterations=2, chunk_size=3)
    assert sum(rec.losses[-1][k] for k in ("bn_input", "bn_early", "bn_mid", "bn_late")) == \
        pytest.approx(rec.losses[-1]["bn"], rel=1e-6)


def test_generation_figure_shows_curves_and_images():
    images, rec = zsq_fast.generate(tiny_net(), 10, "dgh", 8, iterations=5, chunk_size=5)
    fig = plots.generation_figure(rec.to_dict(), images, (0.5,) * 3, (0.25,) * 3)
    w, h = plots.PANEL
    assert fig.width >= 3 * w and fig.height > h + 28
    for k in range(3):  # BN groups, ODSL, lr: each panel has a drawn line
        assert _colored_fraction(fig, (k * w + 70, 28 + 40, k * w + w - 130, 28 + h - 45)) > 0.001, k
    assert _colored_fraction(fig, (0, 28 + h, 8 * 68, fig.height)) > 0.2  # the image grid


def test_cli_generate_and_quantize_write_readable_pngs(tiny, tmp_path, capsys):  # noqa: F811
    imgs = tmp_path / "imgs.pt"
    code, out, err = _run(capsys, "generate", *_model(tiny), "--method", "dgh", "-n", 8, "--iterations", 3,
                          "--chunk-size", 4, "--out", imgs)
    assert code == 0, err
    png = tmp_path / "imgs.report.png"
    assert f"plot {png}" in out
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 3 * plots.PANEL[0]
    code, out, err = _run(capsys, "quantize", *_model(tiny), "--images", imgs, "--method", "brecq",
                          "--iterations", 4, "--batch-size", 4, "--out", tmp_path / "q.pt")
    assert code == 0, err
    rep = json.loads((tmp_path / "q.report.json").read_text())
    units = [u["name"] for u in rep["quant_config"]["brecq"]["units"]]
    curves = rep["reconstruction_curves"]["brecq"]
    assert units and set(curves) == set(units) and all(len(c[0]) == len(c[1]) > 0 for c in curves.values())
    with Image.open(tmp_path / "q.report.png") as im:
        im.load()
        assert _colored_fraction(im, (70, 68, 400, 240)) > 0.001  # the final-loss curve


def test_a_failing_plot_is_a_warning_not_a_failed_run(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    import zsq_fast.cli as cli

    def broken(*a, **k):
        raise RuntimeError("no fonts here")
    monkeypatch.setattr(cli, "generation_figure", broken)
    code, out, err = _run(capsys, "generate", *_model(tiny), "--method", "bns", "-n", 4, "--iterations", 1,
                          "--out", tmp_path / "i.pt")
    assert code == 0 and (tmp_path / "i.pt").exists() and (tmp_path / "i.report.json").exists()
    assert "warning: could not write the plot" in err and not (tmp_path / "i.report.png").exists()


def test_cli_stale_refresh_option(tiny, tmp_path, capsys):  # noqa: F811
    code, _, err = _run(capsys, "generate", *_model(tiny), "--method", "dgh", "--mode", "stale", "--stale-refresh",
                        "before_update", "-n", 4, "--iterations", 1, "--chunk-size", 2, "--out", tmp_path / "i.pt")
    assert code == 0, err
    rep = json.loads((tmp_path / "i.report.json").read_text())
    assert rep["generation"]["dgh"]["settings"]["stale_refresh"] == "before_update"
    code, _, err = _run(capsys, "generate", *_model(tiny), "--method", "dgh", "--stale-refresh", "before_update",
                        "-n", 4, "--iterations", 1, "--out", tmp_path / "j.pt")
    assert code == 2 and "--stale-refresh is for --mode stale only" in err


def test_quantize_with_a_generator_also_plots_the_generation(tiny, tmp_path, capsys):  # noqa: F811
    code, _, err = _run(capsys, "quantize", *_model(tiny), "--generator", "bns", "-n", 4, "--gen-iterations", 2,
                        "--method", "nearest", "--out", tmp_path / "q.pt")
    assert code == 0, err
    with Image.open(tmp_path / "q.report.generation.png") as im:
        im.load()
        assert im.width >= 3 * plots.PANEL[0]
    with Image.open(tmp_path / "q.report.png") as im:  # nearest: no units, the panel says so
        im.load()
        assert im.height > plots.PANEL[1]
