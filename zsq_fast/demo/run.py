"""`zsq-fast demo`: the whole story on an embedded task, offline, on CPU, in a few minutes.

1. train a small BN CNN on scikit-learn's bundled digits (the "pretrained model" a user would have);
2. forget the training data: synthesize calibration images from the model's BN statistics (DGH);
3. quantize with the hardware-friendly preset at W4A4 (and lower weight bits, where the methods
   part): round-to-nearest vs BRECQ on Gaussian noise (no information) vs BRECQ on the synthetic
   images vs BRECQ on real training images (what data-free calibration aims to match);
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
from ..pipeline import parse_bits, run_generate, run_quantize
from ..report import RunReport, seed_everything
from .digits import MEAN, SIZE, STD, load_digits_split, train_digits_cnn
from .grid import save_comparison


@dataclass(frozen=True)
class DemoSettings:
    epochs: int = 15
    n_images: int = 128
    gen_iterations: int = 300
    recon_iterations: int = 400
    bits: tuple[str, ...] = ("W4A4", "W3A4", "W2A4")
    preset: str = "hw"

    @staticmethod
    def quick() -> "DemoSettings":
        return DemoSettings(epochs=3, n_images=32, gen_iterations=10, recon_iterations=10, bits=("W4A4",))


@dataclass
class Row:
    name: str
    calibration: str
    cells: dict  # bits -> (top-1 %, agreement %)


def format_table(rows: list[Row], bits: tuple[str, ...], preset: str, n_test: int) -> str:
    lines = ["| model | calibration images | " + " | ".join(f"{b} {preset}" for b in bits) + " |",
             "| --- | --- |" + " ---: |" * len(bits)]
    for r in rows:
        lines.append(f"| {r.name} | {r.calibration} | " + " | ".join(
            f"{r.cells[b][0]:.2f} / {r.cells[b][1]:.2f}" for b in bits) + " |")
    lines.append(f"\nCells: top-1 % on {n_test} held-out digits / top-1 agreement % with the float model.")
    return "\n".join(lines)


def run_demo(out_dir: str = "demo_out", *, quick: bool = False, settings: DemoSettings | None = None,
             device: torch.device | str = "cpu", seed: int = 0, progress: bool = True,
             echo=print) -> dict:
    """Run the demo; returns {'rows', 'table', 'grid', 'report'} (paths inside out_dir). On CPU it runs
    single-threaded (see below) and restores the thread count afterwards."""
    s = settings or (DemoSettings.quick() if quick else DemoSettings())
    for b in s.bits:
        parse_bits(b)
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The demo's tensors are tiny (16x16, <= 64 channels): intra-op threads buy little and, on a
        # busy machine, their synchronization slowed training 20x in our measurements.
        torch.set_num_threads(1)
    try:
        return _run(out_dir, quick, s, device, seed, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, quick, s: DemoSettings, device, seed, progress, echo) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    report = RunReport("demo", {"out": out_dir, "quick": quick, "device": str(device), "seed": seed, **vars(s)})
    seed_everything(seed)
    t_start = time.perf_counter()

    echo("zsq-fast demo: a small BN CNN trained on scikit-learn's bundled 8x8 digits (upsampled to 16x16), "
         f"quantized with the {s.preset} preset (every layer and the output quantized, power-of-two scales)")
    with report.timed("train"):
        split = load_digits_split(seed=seed)
        model, train_losses = train_digits_cnn(split, epochs=s.epochs, seed=seed, progress=progress)
    report.losses["train"] = train_losses
    src = LoadedModel(model, MEAN, STD, SIZE, "demo:digits_cnn", 10)
    test, train = split.test(), split.train()
    ref = predict_logits(model, test)
    float_top1 = evaluate(model, test)["top1"]
    echo(f"trained in {report.timings_s['train']:.1f} s: {float_top1:.2f} % top-1 on {test.n} held-out digits; "
         "from here on the training images are used only for the real-data reference row")

    n = s.n_images
    synthetic, _, _ = run_generate(src, n, "dgh", device=device, seed=seed, precision="fp32",
                                   iterations=s.gen_iterations, progress=progress, report=report)
    echo(f"synthesized {n} DGH images from the model's BN statistics in {report.timings_s['generate_dgh']:.1f} s")
    real_x, _ = train.take(random_subset(train.n, n, seed))
    noise = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))

    plan = [("round-to-nearest", f"DGH synthetic ({n})", synthetic, "nearest"),
            ("BRECQ", f"Gaussian noise ({n})", noise, "brecq"),
            ("BRECQ", f"DGH synthetic ({n}), data-free", synthetic, "brecq"),
            ("BRECQ", f"real training images ({n})", real_x, "brecq")]
    rows = [Row("float32", "-", {b: (float_top1, 100.0) for b in s.bits})]
    for name, calib_name, calib, method in plan:
        cells = {}
        for bits in s.bits:
            q = run_quantize(src, calib, bits=bits, preset=s.preset, method=method, device=device, seed=seed,
                             precision="fp32", iterations=None if method == "nearest" else s.recon_iterations,
                             progress=progress, report=report, tag=f"{bits}_{method}_{calib_name.split()[0]}")
            r = evaluate(q.cpu(), test, reference_logits=ref)
            cells[bits] = (r["top1"], r["agreement"])
        rows.append(Row(name, calib_name, cells))

    total = time.perf_counter() - t_start
    table = format_table(rows, s.bits, s.preset, test.n)
    title = (f"DGH: {s.gen_iterations} iterations; BRECQ: {s.recon_iterations} iterations per unit"
             f"{' (quick setting)' if quick else ''}; total {total:.0f} s on {device}.")
    grid = save_comparison([("synthetic (DGH, from BN statistics only)", to_uint8_hwc(synthetic[:32], MEAN, STD)),
                            ("real held-out digits", to_uint8_hwc(test.take(range(32))[0], MEAN, STD))],
                           os.path.join(out_dir, "digits_synthetic_vs_real.png"))
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n\n" + title + "\n")
    report.metrics = {"rows": [vars(r) for r in rows], "n_test": test.n, "float_top1": float_top1}
    path = report.write(os.path.join(out_dir, "demo.report.json"), device)
    echo("")
    echo(table)
    echo(title)
    echo("")
    echo(f"image grid: {grid}\nreport:     {path}")
    return {"rows": rows, "table": table, "grid": grid, "report": path}
