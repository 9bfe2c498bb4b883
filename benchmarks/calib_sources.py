"""What reading calibration data lazily costs in BRECQ: the same images as an in-memory tensor (cache host,
recompute), a map-style Dataset and a memory-mapped tensor (cache auto = recompute, and disk).

Random weights and random images (timing only; the quantized models of one cache mode are identical across
sources, tests/test_calib_data.py). Prints one line per configuration: seconds for quantize() and the cache used.

    python benchmarks/calib_sources.py --model resnet20 --images 256 --iterations 20 --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsq_fast.models.zoo import ZOO  # noqa: E402
from zsq_fast.quantize import quantize  # noqa: E402


class TensorItems(Dataset):
    """(image, label) per index, a fresh tensor per read as a decoding Dataset gives."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i].clone(), 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20", choices=list(ZOO))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    entry = ZOO[args.model]
    model = entry.factory().eval()
    size = 16 if args.model == "digits_cnn" else 32
    x = torch.randn(args.images, 3, size, size)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "images.f32")
        x.numpy().tofile(path)
        mm = torch.from_file(path, shared=False, size=x.numel(), dtype=torch.float32).view(x.shape)
        runs = [("tensor", x, "host"), ("tensor", x, "recompute"), ("Dataset", TensorItems(x), "auto"),
                ("memory-mapped tensor", mm, "auto"), ("memory-mapped tensor", mm, "disk")]
        print(f"{args.model}, N={args.images}, BRECQ {args.iterations} iterations/unit, batch {args.batch_size}, "
              f"torch threads {args.threads}")
        for name, src, cache in runs:
            t0 = time.perf_counter()
            q = quantize(model, src, method="brecq", iterations=args.iterations, batch_size=args.batch_size,
                         cache=cache)
            dt = time.perf_counter() - t0
            print(f"  {name:22s} cache={cache:9s} -> {q.quant_config['reconstruction']['cache']:9s} {dt:7.1f} s")


if __name__ == "__main__":
    main()
