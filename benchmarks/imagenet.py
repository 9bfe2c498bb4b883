"""ImageNet on real images (issue 30): pretrained EfficientNet-Lite0/1/2, bit widths x presets x calibration sources.

Data: ../shared/data/imagenet_sample (500 real ImageNet images, one per even class index). Real calibration images
come from the 250 whose class index is divisible by 4; every column is evaluated on the other 250, so all columns
share one evaluation set. Per model: FP top-1 on the evaluation images; then each calibration source (made once
per seed, serving every cell): dgh / bns (generated from the BN statistics), fdda (class centers from one real
image per class of the calibration half), real (a random subset of the calibration half), noise (Gaussian noise in
the model's input space: the floor); each bits x preset cell quantizes with it and reports top-1 and top-1
agreement with FP on the evaluation images, and seconds. Every setting really used is in the table's header and
in the JSON; rows with several seeds give mean ± sd.

    python benchmarks/imagenet.py --models efficientnet_lite0 --bits W8A8,W4A8 --calib dgh,real --n-images 32 \\
        --gen-iterations 10                                                         # a reduced CPU setting
    python benchmarks/imagenet.py --setting full                 # 256 images x 500 iterations, BRECQ 20000 (GPU)

Writes markdown to --out (default benchmarks/results_imagenet.md) and every number to the matching .json after
every cell, so a long run can be read while it goes. --quantize-arg KEY=VALUE passes options to quantize()
(e.g. equalize=true); a cell label says which.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq_fast  # noqa: E402
from zsq_fast.data import load_images_for, random_subset  # noqa: E402
from zsq_fast.evaluate import agreement, accuracy, predict_logits  # noqa: E402
from zsq_fast.models.zoo import load_model  # noqa: E402

DATA = os.environ.get("ZSQ_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
SAMPLE = os.path.join(DATA, "imagenet_sample")
CALIB_CLASSES, EVAL_CLASSES = "%4=0", "%4!=0"
SOURCES = ("dgh", "bns", "fdda", "real", "noise")
SETTINGS = {  # the full strength for a GPU; the CPU rows are reduced and say so
    "full": dict(n_images=256, gen_iterations=500, method="brecq", recon_iterations=20000, seeds="0,1,2"),
    "cpu": dict(n_images=32, gen_iterations=10, method="nearest", recon_iterations=None, seeds="0"),
}


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def calibration_images(source: str, lm, real, n: int, args, seed: int) -> tuple[torch.Tensor, float]:
    """(images in the model's input space, seconds to make them)."""
    t = time.perf_counter()
    size = lm.input_size
    if source == "real":
        x, _ = real.take(random_subset(real.n, min(n, real.n), seed))
    elif source == "noise":
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    else:
        kw = dict(iterations=args.gen_iterations, chunk_size=min(args.chunk_size, n), seed=seed, mean=lm.mean,
                  std=lm.std, amp=args.amp, channels_last=args.channels_last)
        if source == "fdda":
            xr, yr = real.take(range(real.n))  # one real image per class of the calibration half
            kw.update(real_images=xr, real_labels=yr)
        x, _ = zsq_fast.generate(lm.model, n, source, size, **kw)
    return x, time.perf_counter() - t


def cell(lm, calib, evalset, fp_logits, bits, preset, args, qargs, seed: int) -> dict:
    t = time.perf_counter()
    kw = dict(qargs)
    if args.method != "nearest":
        kw.update(iterations=args.recon_iterations)
    q = zsq_fast.quantize(lm.model, calib, bits, preset=preset, method=args.method, seed=seed,
                          batch_size=args.batch_size, **kw)
    logits = predict_logits(q, evalset, batch_size=args.eval_batch)
    return {"top1": 100 * accuracy(logits, evalset.labels, 1), "agree": 100 * agreement(logits, fp_logits),
            "s": time.perf_counter() - t}


def _fmt(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=SETTINGS, default="cpu")
    p.add_argument("--models", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    p.add_argument("--bits", default="W8A8,W4A8,W4A4")
    p.add_argument("--presets", default="hw")
    p.add_argument("--calib", default=",".join(SOURCES))
    p.add_argument("--n-images", type=int)
    p.add_argument("--gen-iterations", type=int)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--method", choices=("nearest", "adaround", "brecq"))
    p.add_argument("--recon-iterations", type=int)
    p.add_argument("--seeds")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=50)
    p.add_argument("--amp", default=None, help="generation autocast (bf16 on a CPU with native bf16)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--quantize-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results_imagenet.md"))
    args = p.parse_args(argv)
    for k, v in SETTINGS[args.setting].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not os.path.isdir(SAMPLE):
        sys.exit(f"no ImageNet sample at {SAMPLE} (../shared/data/imagenet_sample; set ZSQ_SHARED_DATA)")
    torch.set_num_threads(args.threads)
    qargs = {}
    for kv in args.quantize_arg:
        k, _, v = kv.partition("=")
        qargs[k] = _value(v)
    seeds = [int(s) for s in str(args.seeds).split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)"
    reduced = "" if args.setting == "full" and args.n_images >= 256 and args.gen_iterations >= 500 else \
        " **reduced setting**"
    header = (f"commit {commit}, {device}; calibration: {args.n_images} images (real: from the 250 sample images "
              f"of class index %4=0; fdda: those 250 as its one real image per class), generation "
              f"{args.gen_iterations} iterations, chunk {args.chunk_size}, amp {args.amp}, channels_last "
              f"{args.channels_last}; rounding {args.method}"
              f"{'' if args.method == 'nearest' else f' ({args.recon_iterations} iterations per unit)'}; "
              f"quantize options {qargs or 'defaults'}; seeds {seeds}; evaluation: the 250 sample images of "
              f"class index %4!=0 (224/240/260 px, bicubic, as each model's card).{reduced}\n")
    bits, presets, sources = args.bits.split(","), args.presets.split(","), args.calib.split(",")
    cols = [(b, pr) for b in bits for pr in presets]
    head = ("| model | calibration | FP top-1 | " + " | ".join(f"{b} {pr} top-1 / agr." for b, pr in cols)
            + " | gen s | quantize+eval s |")
    lines = [header, head, "|" + "---|" * (head.count("|") - 1)]
    results = {"settings": {**vars(args), "quantize_args": qargs}, "commit": commit, "device": device, "rows": []}

    def write():
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)

    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        lm = load_model(name)
        lm.model.eval()
        prep = lm.preprocessing()
        evalset = load_images_for(SAMPLE, **prep, classes=EVAL_CLASSES)
        real = load_images_for(SAMPLE, **prep, classes=CALIB_CLASSES)
        fp_logits = predict_logits(lm.model, evalset, batch_size=args.eval_batch)
        fp = 100 * accuracy(fp_logits, evalset.labels, 1)
        for source in sources:
            row = {"model": name, "calibration": source, "fp_top1": fp, "cells": {}, "gen_s": [], "q_s": []}
            for seed in seeds:
                calib, gen_s = calibration_images(source, lm, real, args.n_images, args, seed)
                row["gen_s"].append(gen_s)
                for b, pr in cols:
                    r = cell(lm, calib, evalset, fp_logits, b, pr, args, qargs, seed)
                    row["cells"].setdefault(f"{b}:{pr}", []).append(r)
                    row["q_s"].append(r["s"])
                    print(f"  {name} {source} seed {seed} {b} {pr}: top-1 {r['top1']:.1f}, agreement "
                          f"{r['agree']:.1f}, {r['s']:.0f} s", flush=True)
            cells = [row["cells"][f"{b}:{pr}"] for b, pr in cols]
            lines.append(f"| {name} | {source} | {fp:.1f} | " + " | ".join(
                f"{_fmt([c['top1'] for c in cs])} / {_fmt([c['agree'] for c in cs])}" for cs in cells)
                + f" | {sum(row['gen_s']):.0f} | {sum(row['q_s']):.0f} |")
            results["rows"].append(row)
            print(lines[-1], flush=True)
            write()
    write()


if __name__ == "__main__":
    main()
