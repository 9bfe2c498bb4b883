"""Accuracy benchmark on ../shared/data: CIFAR-10 ResNet-20/56, calibration source x bit setting.

Rows: float / real data (1024 images of cifar10_train_subset) / bns / dgh (exact) / dgh (stale) /
fdda (1 real image per class). Columns: W4A4, W3A8, W2A4, W8A8 hw and W4A4 academic, all with BRECQ.
Cell: top-1 on cifar10_test_exact1017 (exact pixels) / top-1 agreement with the float model on
cifar10_test (10k JPEG copy). Each generator runs once per model; its images serve every column.

    python benchmarks/accuracy.py                      # ResNet-20 and -56, counts for the device
    python benchmarks/accuracy.py --models resnet20 --quick
    python benchmarks/accuracy.py --models resnet20 --n-images 64 --gen-iterations 5 --recon-iterations 5 \
        --columns W4A4:hw --agreement-limit 500       # a smoke run

Iteration counts: full (1000 generation steps, BRECQ's 20000 per block) on a GPU; reduced on CPU
(--quick reduces more); the counts used are printed above each table. Writes markdown to --out
(default benchmarks/results_accuracy.md) and every number with timings to the matching .json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsq_fast.cli import run_generate, run_quantize  # noqa: E402
from zsq_fast.data import load_images_for, one_per_class, random_subset  # noqa: E402
from zsq_fast.evaluate import agreement, evaluate, predict_logits  # noqa: E402
from zsq_fast.models.zoo import load_model  # noqa: E402
from zsq_fast.report import RunReport, resolve_device, seed_everything  # noqa: E402

DATA = os.environ.get("ZSQ_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
COLUMNS = ["W4A4:hw", "W3A8:hw", "W2A4:hw", "W8A8:hw", "W4A4:academic"]
ROWS = ["real", "bns", "dgh_exact", "dgh_stale", "fdda"]
ROW_NAMES = {"float": "float (fp32)", "real": "real data (train images)", "bns": "bns",
             "dgh_exact": "dgh (exact)", "dgh_stale": "dgh (stale)", "fdda": "fdda (1 real image/class)"}
# (n_images, generation iterations, BRECQ iterations per block)
COUNTS = {"gpu": (1024, 1000, 20000), "cpu": (1024, 200, 200), "quick": (256, 50, 50)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--rows", default=",".join(ROWS), help=f"subset of {ROWS}")
    p.add_argument("--columns", default=",".join(COLUMNS), help="BITS:PRESET list")
    p.add_argument("--quick", action="store_true",
                   help="256 images, 50 generation and 50 BRECQ iterations, agreement on 2000 images "
                        "(CPU, about 30 min for ResNet-20 on 2 cores)")
    p.add_argument("--n-images", type=int)
    p.add_argument("--gen-iterations", type=int)
    p.add_argument("--recon-iterations", type=int)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="BRECQ batch size")
    p.add_argument("--agreement-limit", type=int, help="first N images of cifar10_test only")
    p.add_argument("--data", default=DATA)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_accuracy.md"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def counts(args, device) -> tuple[int, int, int]:
    base = COUNTS["quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")]
    return (args.n_images or base[0], args.gen_iterations or base[1], args.recon_iterations or base[2])


def calibration_sets(src, name, rows, n_images, gen_iters, args, device, report) -> dict[str, torch.Tensor]:
    """Calibration images per row: real subset, or generated once per generator (shared by all columns)."""
    train = load_images_for(os.path.join(args.data, "cifar10_train_subset.npz"), src.mean, src.std, src.input_size)
    out = {}
    progress = not args.no_progress
    for row in rows:
        t0 = time.perf_counter()
        if row == "real":
            out[row], _ = train.take(random_subset(train.n, min(n_images, train.n), args.seed))
        elif row in ("bns", "dgh_exact", "dgh_stale", "fdda"):
            method = row.split("_")[0]
            mode = "stale" if row == "dgh_stale" else ("exact" if row == "dgh_exact" else None)
            real = train.subset(one_per_class(train.labels, 1, args.seed)) if method == "fdda" else None
            images, _, _ = run_generate(src, n_images, method, device=device, seed=args.seed, precision="fp32",
                                        iterations=gen_iters, chunk_size=args.chunk_size, mode=mode, real=real,
                                        progress=progress, report=None)
            out[row] = images
        else:
            raise ValueError(f"unknown row {row!r}; choose from {ROWS}")
        report.timings_s[f"{name}/calibration/{row}"] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] calibration {row}: {out[row].shape[0]} images in "
              f"{report.timings_s[f'{name}/calibration/{row}']:.1f} s", file=sys.stderr)
    return out


def run_model(name: str, args, device, rows, columns, report: RunReport) -> dict:
    src = load_model(name, os.path.join(args.data, "weights", f"cifar10_{name}.pt"))
    src.model.to(device)
    exact = load_images_for(os.path.join(args.data, "cifar10_test_exact1017.npz"), src.mean, src.std, src.input_size)
    jpeg = load_images_for(os.path.join(args.data, "cifar10_test.npz"), src.mean, src.std, src.input_size,
                           limit=args.agreement_limit or (2000 if args.quick else None))
    ref_jpeg = predict_logits(src.model, jpeg, device=device)
    float_top1 = evaluate(src.model, exact, device=device)["top1"]
    n_images, gen_iters, recon_iters = counts(args, device)
    calib = calibration_sets(src, name, rows, n_images, gen_iters, args, device, report)
    cells = {}
    for row in rows:
        for col in columns:
            bits, preset = col.split(":")
            t0 = time.perf_counter()
            q = run_quantize(src, calib[row], bits=bits, preset=preset, method="brecq", device=device,
                             seed=args.seed, precision="fp32", iterations=recon_iters, batch_size=args.batch_size,
                             progress=not args.no_progress, report=None)
            top1 = evaluate(q, exact, device=device)["top1"]
            agree = 100 * agreement(predict_logits(q, jpeg, device=device), ref_jpeg)
            cells[f"{row}|{col}"] = {"top1": top1, "agreement": round(agree, 3),
                                     "seconds": round(time.perf_counter() - t0, 1)}
            print(f"[{name}] {row:10s} {col:14s} top-1 {top1:6.2f}  agreement {agree:6.2f}  "
                  f"({cells[f'{row}|{col}']['seconds']} s)", file=sys.stderr)
            _write(args, report, {**report.metrics, name: _result(float_top1, jpeg.n, n_images, gen_iters,
                                                                   recon_iters, rows, columns, cells, device)})
    return _result(float_top1, jpeg.n, n_images, gen_iters, recon_iters, rows, columns, cells, device)


def _result(float_top1, n_agree, n_images, gen_iters, recon_iters, rows, columns, cells, device):
    return {"float_top1": float_top1, "n_agreement": n_agree, "n_images": n_images,
            "gen_iterations": gen_iters, "recon_iterations": recon_iters, "rows": rows, "columns": columns,
            "cells": cells, "device": str(device)}


def markdown(results: dict) -> str:
    out = ["## Accuracy: CIFAR-10 (benchmarks/accuracy.py)", "",
           "Cell: top-1 % on cifar10_test_exact1017 (n=1017, exact pixels) / top-1 agreement % with the float "
           "model on cifar10_test (JPEG copy). BRECQ reconstruction in every quantized cell.", ""]
    for name, r in results.items():
        out += [f"### {name} (float top-1 {r['float_top1']:.2f} %)", "",
                f"Settings: {r['n_images']} calibration images, {r['gen_iterations']} generation iterations, "
                f"{r['recon_iterations']} BRECQ iterations per block, agreement on {r['n_agreement']} images, "
                f"device {r['device']}.", "",
                "| calibration | " + " | ".join(c.replace(":", " ") for c in r["columns"]) + " |",
                "| --- |" + " ---: |" * len(r["columns"])]
        out.append(f"| {ROW_NAMES['float']} | " + " | ".join(f"{r['float_top1']:.2f} / 100.00"
                                                             for _ in r["columns"]) + " |")
        for row in r["rows"]:
            cells = [r["cells"].get(f"{row}|{c}") for c in r["columns"]]
            out.append(f"| {ROW_NAMES[row]} | " + " | ".join(
                "…" if c is None else f"{c['top1']:.2f} / {c['agreement']:.2f}" for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def _write(args, report: RunReport, results: dict) -> None:
    with open(args.out, "w") as f:
        f.write(markdown(results) + "\n")
    report.metrics = results
    report.write(os.path.splitext(args.out)[0] + ".json")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    rows = [r for r in args.rows.split(",") if r]
    columns = [c for c in args.columns.split(",") if c]
    for c in columns:
        if c.count(":") != 1:
            raise SystemExit(f"bad column {c!r}: expected BITS:PRESET, e.g. W4A4:hw")
    report = RunReport("benchmarks/accuracy.py", vars(args) | {"device": str(device)})
    results = {}
    for name in [m for m in args.models.split(",") if m]:
        results[name] = run_model(name, args, device, rows, columns, report)
        _write(args, report, results)
    print(markdown(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
