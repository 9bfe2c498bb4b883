"""CPU generation speed: DGH (exact) on the CIFAR ResNet-20 in fp32 NCHW against bf16 autocast +
channels_last, same seed and settings; steps per second (setup excluded) and the final whole-set BN loss.

    python benchmarks/cpu_amp.py [--n 256] [--iterations 30] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zsq_fast.generate import generate  # noqa: E402
from zsq_fast.models.zoo import load_model  # noqa: E402

CONFIGS = {"fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"amp": "bf16"},
           "bf16+channels_last": {"amp": "bf16", "channels_last": True}}


def resnet20():
    weights = os.path.join(ROOT, "..", "shared", "data", "weights", "cifar10_resnet20.pt")
    return load_model("resnet20", weights if os.path.exists(weights) else None)


def measure(n: int, iterations: int, chunk: int, seed: int = 0) -> list[dict]:
    src = resnet20()
    rows = []
    for name, kw in CONFIGS.items():
        common = dict(method="dgh", image_size=32, chunk_size=chunk, mean=src.mean, std=src.std, device="cpu", **kw)
        generate(src.model, min(n, 16), iterations=1, seed=seed + 1, **common)  # warm-up (oneDNN kernel choice)
        _, rec = generate(src.model, n, iterations=iterations, seed=seed, **common)
        rows.append({"config": name, "steps_per_s": 1.0 / rec.timings["per_step_s"],
                     "initial_bn": rec.initial_bn_loss, "final_bn": rec.final_bn_loss})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="8 images, 2 iterations (a dry run)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n, iters = (8, 2) if a.quick else (a.n, a.iterations)
    rows = measure(n, iters, min(a.chunk, n))
    weights = resnet20().info.get("weights", "?")
    base = rows[0]["steps_per_s"]
    print(f"ResNet-20 32 px, DGH exact, N={n}, chunk {min(a.chunk, n)}, {iters} iterations, seed 0, "
          f"CPU, torch threads {a.threads}, weights {weights}")
    print("| config | steps/s | speed-up | initial BN loss | final BN loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['steps_per_s']:.3f} | {r['steps_per_s'] / base:.2f}x | "
              f"{r['initial_bn']:.4f} | {r['final_bn']:.4f} |")


if __name__ == "__main__":
    main()
