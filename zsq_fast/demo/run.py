"""`zsq-fast demo`: the whole story on an embedded task, offline, on CPU, in a few minutes.

1. train a small BN CNN on scikit-learn's bundled digits (the "pretrained model" a user would have);
2. forget the training data: synthesize calibration images from the model's BN statistics (DGH);
3. quantize to W4A4 with the hardware-friendly preset: round-to-nearest vs BRECQ on the synthetic
   images vs BRECQ on real training images (the upper bound data-free calibration aims for);
4. print a table of held-out top-1 and agreement with the float model, save a PNG sheet of the
   synthetic images beside real ones, and a JSON report.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ..data import random_subset, to_uint8_hwc
from ..evaluate import evaluate, predict_logits
from ..models.zoo import LoadedModel
from ..report import RunReport, seed_everything
from .digits import MEAN, SIZE, STD, load_digits_split, train_digits_cnn
from .grid import save_comparison


@dataclass(frozen=True)
class DemoSettings:
    epochs: int = 15
    n_images: int = 256
    gen_iterations: int = 500
    recon_iterations: int = 1000
    bits: str = "W4A4"
    preset: str = "hw"

    @staticmethod
    def quick() -> "DemoSettings":
        return DemoSettings(epochs=3, n_images=32, gen_iterations=10, recon_iterations=10)


@dataclass
class Row:
    name: str
    calibration: str
    top1: float
    agreement: float
    seconds: float


def format_table(rows: list[Row], n_test: int, title: str) -> str:
    lines = [f"{title}", "",
             f"| model | calibration data | top-1 (held-out, n={n_test}) | agreement with float | time |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.name} | {r.calibration} | {r.top1:.2f} % | {r.agreement:.2f} % | {r.seconds:.1f} s |")
    return "\n".join(lines)


def run_demo(out_dir: str = "demo_out", *, quick: bool = False, settings: DemoSettings | None = None,
             device: torch.device | str = "cpu", seed: int = 0, progress: bool = True,
             echo=print) -> dict:
    """Run the demo; returns {'rows', 'table', 'grid', 'report'} (paths inside out_dir)."""
    from ..cli import run_generate, run_quantize

    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    device = torch.device(device)
    os.makedirs(out_dir, exist_ok=True)
    report = RunReport("demo", {"out": out_dir, "quick": quick, "device": str(device), "seed": seed, **vars(s)})
    seed_everything(seed)

    echo("zsq-fast demo: a BN CNN on scikit-learn's bundled digits (16x16), quantized to "
         f"{s.bits} ({s.preset} preset: every layer and the output at {s.bits}, power-of-two scales)")
    with report.timed("train"):
        split = load_digits_split(seed=seed)
        model, train_losses = train_digits_cnn(split, epochs=s.epochs, seed=seed, progress=progress)
    report.losses["train"] = train_losses
    src = LoadedModel(model, MEAN, STD, SIZE, "demo:digits_cnn", 10)
    test, train = split.test(), split.train()
    ref = predict_logits(model, test)
    rows = [Row("float32", "-", evaluate(model, test)["top1"], 100.0, report.timings_s["train"])]
    echo(f"trained in {report.timings_s['train']:.1f} s; the training images are now set aside")

    t0 = time.perf_counter()
    synthetic, _, _ = run_generate(src, s.n_images, "dgh", device=device, seed=seed, precision="fp32",
                                   iterations=s.gen_iterations, progress=progress, report=report)
    gen_s = time.perf_counter() - t0
    real_x, _ = train.take(random_subset(train.n, s.n_images, seed))

    def quantized_row(name, calib, method, calib_name, extra_s=0.0):
        t = time.perf_counter()
        q = run_quantize(src, calib, bits=s.bits, preset=s.preset, method=method, device=device, seed=seed,
                         precision="fp32", iterations=None if method == "nearest" else s.recon_iterations,
                         progress=progress, report=report, tag=f"{method}_{calib_name.split()[0]}")
        r = evaluate(q.cpu(), test, reference_logits=ref)
        rows.append(Row(name, calib_name, r["top1"], r["agreement"], time.perf_counter() - t + extra_s))

    n = s.n_images
    quantized_row(f"{s.bits} round-to-nearest", synthetic, "nearest", f"DGH synthetic ({n}, no real data)")
    quantized_row(f"{s.bits} BRECQ", synthetic, "brecq", f"DGH synthetic ({n}, no real data)", gen_s)
    quantized_row(f"{s.bits} round-to-nearest", real_x, "nearest", f"real training images ({n})")
    quantized_row(f"{s.bits} BRECQ", real_x, "brecq", f"real training images ({n})")

    title = (f"Digits CNN, {s.bits} {s.preset}; DGH {s.gen_iterations} iterations, BRECQ {s.recon_iterations} "
             f"iterations per block{' (quick setting)' if quick else ''}. Time of the DGH row includes generation.")
    table = format_table(rows, test.n, title)
    grid = save_comparison([("synthetic (DGH, from BN statistics only)", to_uint8_hwc(synthetic[:32], MEAN, STD)),
                            ("real held-out digits", to_uint8_hwc(test.take(range(32))[0], MEAN, STD))],
                           os.path.join(out_dir, "digits_synthetic_vs_real.png"))
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    report.metrics = {"rows": [vars(r) for r in rows], "n_test": test.n}
    path = report.write(os.path.join(out_dir, "demo.report.json"), device)
    echo("")
    echo(table)
    echo("")
    echo(f"image grid: {grid}\nreport:     {path}")
    return {"rows": rows, "table": table, "grid": grid, "report": path}
