"""CPU generation speed: DGH (exact) on the CIFAR ResNet-20 in fp32 NCHW against channels_last, bf16
autocast and both; steps per second (setup excluded) and the final whole-set BN loss.

Speed: `repeats` rounds, each timing every configuration for `time_iterations` steps in turn, so a
load change on a shared machine hits all configurations alike; reported: the median steps/s and the
median of the per-round ratios to fp32. Loss: one run of `iterations` steps per configuration in
{fp32, bf16+channels_last}, same seed.

    python benchmarks/cpu_amp.py [--n 256] [--iterations 30] [--repeats 3] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zsq_fast.generate import generate  # noqa: E402
from zsq_fast.models.zoo import load_model  # noqa: E402

CONFIGS = {"fp32": {}, "channels_last": {"channels_last": True}, "bf16": {"amp": "bf16"},
           "bf16+channels_last": {"amp": "bf16", "channels_last": True}}
LOSS_CONFIGS = ("fp32", "bf16+channels_last")


def resnet20():
    weights = os.path.join(ROOT, "..", "shared", "data", "weights", "cifar10_resnet20.pt")
    return load_model("resnet20", weights if os.path.exists(weights) else None)


def run(src, name: str, n: int, iterations: int, chunk: int, seed: int = 0):
    return generate(src.model, n, "dgh", 32, iterations=iterations, chunk_size=chunk, mean=src.mean, std=src.std,
                    device="cpu", seed=seed, **CONFIGS[name])[1]


def measure(n: int, chunk: int, time_iterations: int, repeats: int, iterations: int) -> dict:
    src = resnet20()
    for name in CONFIGS:  # warm-up (oneDNN kernel choice, allocator), not timed
        run(src, name, min(n, 16), 1, min(chunk, 16), seed=1)
    speed = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name in CONFIGS:
            speed[name].append(1.0 / run(src, name, n, time_iterations, chunk).timings["per_step_s"])
    loss = {name: run(src, name, n, iterations, chunk) for name in LOSS_CONFIGS}
    return {"speed": speed, "loss": loss, "weights": src.info.get("weights", "random init")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--time-iterations", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iterations", type=int, default=30, help="steps of the loss runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="8 images, 1 step, 1 round (a dry run)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n, t_it, reps, iters = (8, 1, 1, 2) if a.quick else (a.n, a.time_iterations, a.repeats, a.iterations)
    chunk = min(a.chunk, n)
    r = measure(n, chunk, t_it, reps, iters)
    base = r["speed"]["fp32"]
    print(f"ResNet-20 32 px, DGH exact, N={n}, chunk {chunk}, CPU, torch threads {a.threads}, weights {r['weights']}; "
          f"speed: {reps} rounds x {t_it} steps per configuration; loss: {iters} steps, seed 0")
    print("| config | steps/s (median) | speed-up vs fp32 (median of rounds) | initial BN loss | final BN loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, sps in r["speed"].items():
        ratio = statistics.median(s / b for s, b in zip(sps, base))
        rec = r["loss"].get(name)
        losses = f"{rec.initial_bn_loss:.4f} | {rec.final_bn_loss:.4f}" if rec else "- | -"
        print(f"| {name} | {statistics.median(sps):.3f} | {ratio:.2f}x | {losses} |")


if __name__ == "__main__":
    main()
