"""Does BRECQ reconstruction converge at the iteration counts people run? (CIFAR-10 ResNet-20, real data)

Quantizes ResNet-20 (../shared/data weights) with BRECQ on 256 real training images (a seeded random subset of
cifar10_train_subset) at each (iterations per unit, lr on V, act_lr) in --cells, and prints top-1 on
cifar10_test_exact1017 and top-1 agreement with the float model on cifar10_test (10k JPEG copy, or the first
--agreement-limit images). lr/act_lr "auto" = zsq_fast's defaults for that count (adaround.default_rates).
Every cell is written to --out (JSON) as soon as it is done.

    python benchmarks/recon_convergence.py --cells 2000:auto:auto,200:auto:auto --threads 1
    python benchmarks/recon_convergence.py --cells 2000:1e-3:4e-4          # BRECQ's rates at 10x fewer steps
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq_fast  # noqa: E402
from zsq_fast.data import load_images_for, random_subset  # noqa: E402
from zsq_fast.evaluate import agreement, evaluate, predict_logits  # noqa: E402
from zsq_fast.models.zoo import load_model  # noqa: E402

DATA = os.environ.get("ZSQ_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def parse_cell(text: str) -> tuple[int, float | None, float | None]:
    it, lr, act = (text.split(":") + ["auto", "auto"])[:3]
    val = lambda v: None if v == "auto" else float(v)  # noqa: E731
    return int(it), val(lr), val(act)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--preset", default="hw")
    p.add_argument("--cells", default="2000:auto:auto", help="ITER:LR:ACT_LR,... (auto = the default)")
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agreement-limit", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="recon_convergence.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    src = load_model(args.model, os.path.join(DATA, "weights", f"cifar10_{args.model}.pt"))
    load = lambda name, limit=None: load_images_for(os.path.join(DATA, name), src.mean, src.std,  # noqa: E731
                                                    src.input_size, limit=limit)
    train = load("cifar10_train_subset.npz")
    calib, _ = train.take(random_subset(train.n, args.n_images, args.seed))
    exact, test = load("cifar10_test_exact1017.npz"), load("cifar10_test.npz", args.agreement_limit)
    ref = predict_logits(src.model, test)
    results = {"settings": {**vars(args), "torch_threads": torch.get_num_threads(), "zsq_fast": zsq_fast.__file__},
               "float_top1": evaluate(src.model, exact)["top1"], "cells": []}
    for cell in args.cells.split(","):
        iters, lr, act_lr = parse_cell(cell)
        kw = {k: v for k, v in (("lr", lr), ("act_lr", act_lr)) if v is not None}
        t0 = time.perf_counter()
        q = zsq_fast.quantize(src.model, calib, args.bits, preset=args.preset, method="brecq", iterations=iters,
                              seed=args.seed, **kw)
        secs = time.perf_counter() - t0
        rec = q.quant_config["reconstruction"]
        row = {"iterations": iters, "lr": rec["lr"], "act_lr": rec["act_lr"], "quantize_s": round(secs, 1),
               "top1_exact1017": evaluate(q, exact)["top1"],
               "agreement_test": round(100 * agreement(predict_logits(q, test), ref), 3), "n_agreement": test.n,
               "unit_losses": [u["loss"] for u in q.quant_config["units"]]}
        results["cells"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
