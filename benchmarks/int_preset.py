"""hw (power-of-two scales) vs int (free scales, activation zero points) on CIFAR-10 ResNet-20, nearest rounding.

Real calibration (the first 256 images of cifar10_train_subset), top-1 on cifar10_test_exact1017 for the
fake-quant model and for its ONNX export in onnxruntime (default session options), with the arg-max agreement
and the largest logit difference in output steps between the two. Prints a markdown table.

    python benchmarks/int_preset.py [--bits W4A4 W8A8] [--presets hw int]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq_fast  # noqa: E402
from zsq_fast.data import load_images_for  # noqa: E402
from zsq_fast.evaluate import accuracy, predict_logits  # noqa: E402
from zsq_fast.models import resnet20  # noqa: E402
from zsq_fast.models.zoo import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", nargs="+", default=["W4A4", "W8A8"])
    ap.add_argument("--presets", nargs="+", default=["hw", "int"])
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    m = resnet20()
    m.load_state_dict(torch.load(args.data / "weights" / "cifar10_resnet20.pt", map_location="cpu", weights_only=True))
    m.eval()
    calib = load_images_for(str(args.data / "cifar10_train_subset.npz"), IMAGENET_MEAN, IMAGENET_STD, 32, limit=256)
    test = load_images_for(str(args.data / "cifar10_test_exact1017.npz"), IMAGENET_MEAN, IMAGENET_STD, 32)
    x_cal = calib.take(range(calib.n))[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    fp = accuracy(predict_logits(m, test), test.labels) * 100
    print(f"commit {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"calib 256 real, test {test.n} (cifar10_test_exact1017); float top-1 {fp:.2f}\n")
    print("| bits | preset | top-1 fake-quant | top-1 onnxruntime | agreement | max logit diff (steps) | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for preset in args.presets:
            t = time.perf_counter()
            q = zsq_fast.quantize(m, x_cal, bits, preset=preset, method="nearest")
            dt = time.perf_counter() - t
            top1 = accuracy(predict_logits(q, test), test.labels) * 100
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "q.onnx")
                zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 32, 32))
                r = zsq_fast.evaluate_onnx(path, test, reference=q)
            print(f"| {bits} | {preset} | {top1:.2f} | {r['top1']:.2f} | {r['agreement']:.2f} | "
                  f"{r['max_logit_diff_steps']:.2f} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
