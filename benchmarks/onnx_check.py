"""Real check of the ONNX export: CIFAR-10 ResNets, hw preset, nearest rounding, real calibration images.

For each model and bit width: quantize (first N images of ../shared/data/cifar10_train_subset.npz), export to
ONNX, run it through onnxruntime (CPU) with graph optimizations disabled, with the default options (what
users run) and with the default options plus session.x64quantprecision=1 (exact int8 kernels on an x86 CPU
without VNNI, where the defaults saturate; zsq_fast.onnx_eval says why), and print top-1 on
cifar10_test_exact1017.npz, arg-max agreement with the fake-quant model and the largest logit difference (also
in output quantization steps), and each mode's time per image (the whole test set in one session.run, after one
warm-up run, median of --repeat runs; modes timed side by side in one process).

    python benchmarks/onnx_check.py [--data ../shared/data] [--models resnet20,resnet56] [--bits W8A8,W4A8,W4A4]
                                    [--calib 256] [--opset 21] [--threads 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxruntime as ort  # noqa: E402

import zsq_fast  # noqa: E402
from zsq_fast.data import load_images_for  # noqa: E402
from zsq_fast.models.zoo import IMAGENET_MEAN, IMAGENET_STD, ZOO  # noqa: E402
from zsq_fast.onnx_eval import EXACT_INT8, int8_saturates  # noqa: E402


def load_npz(path: Path, n: int | None = None):
    data = load_images_for(str(path), IMAGENET_MEAN, IMAGENET_STD, 32, limit=n)
    return data.take(torch.arange(data.n))


MODES = {"disabled": (False, False), "default (ENABLE_ALL)": (True, False),
         f"default + {EXACT_INT8[0]}": (True, True)}


def run_onnx(path: str, x: torch.Tensor, optimize: bool, threads: int, exact_int8: bool = False,
             repeat: int = 0) -> tuple[np.ndarray, float | None]:
    """The logits, and the median seconds of `repeat` timed runs after a warm-up (None when repeat is 0)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if exact_int8:
        opts.add_session_config_entry(*EXACT_INT8)
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    out = session.run(None, feed)[0]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return out, (statistics.median(times) if times else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--bits", default="W8A8,W4A8,W4A4")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--opset", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per mode (0: no timing)")
    args = ap.parse_args()
    if not (args.data / "weights" / "cifar10_resnet20.pt").exists():
        print(f"skipped: real data not found at {args.data}")
        return
    torch.set_num_threads(args.threads)
    calib, _ = load_npz(args.data / "cifar10_train_subset.npz", args.calib)
    x, y = load_npz(args.data / "cifar10_test_exact1017.npz")
    y = y.numpy()
    rows = []
    for name in args.models.split(","):
        model = ZOO[name].factory()
        model.load_state_dict(torch.load(args.data / "weights" / f"cifar10_{name}.pt", map_location="cpu",
                                         weights_only=True))
        model.eval()
        for bits in args.bits.split(","):
            q = zsq_fast.quantize(model, calib, bits, preset="hw", method="nearest", seed=0)
            with torch.no_grad():
                ref = q(x).numpy()
            step = float(q.output_quantizer.effective_scale())
            with tempfile.TemporaryDirectory() as tmp:
                path = str(Path(tmp) / "q.onnx")
                zsq_fast.export_onnx(q, path, x[:1], opset=args.opset)
                for mode, (optimize, exact) in MODES.items():
                    out, seconds = run_onnx(path, x, optimize, args.threads, exact, args.repeat)
                    diff = float(np.abs(out - ref).max())
                    ms = None if seconds is None else 1e3 * seconds / x.shape[0]
                    rows.append((name, bits, mode,
                                 100 * (out.argmax(1) == y).mean(), 100 * (ref.argmax(1) == y).mean(),
                                 100 * (out.argmax(1) == ref.argmax(1)).mean(), diff, diff / step, ms))
            print(f"done {name} {bits}", flush=True)
    print(f"\nCIFAR-10, hw preset, nearest rounding, mse calibration, {calib.shape[0]} real calibration images "
          f"(cifar10_train_subset), {x.shape[0]} test images (cifar10_test_exact1017), ONNX opset {args.opset}, "
          f"onnxruntime {ort.__version__} CPUExecutionProvider, torch and onnxruntime threads={args.threads}; "
          f"this CPU {'saturates' if int8_saturates() else 'does not saturate'} int8 pair sums (x86 without "
          f"VNNI); time: median of {args.repeat} runs of the {x.shape[0]} images in one batch\n")
    print("| model | export | onnxruntime graph optimizations | top-1 (onnxruntime) | top-1 (fake-quant) | "
          "argmax agreement | max abs logit diff (output steps) | ms per image |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, bits, opt, top1, ref1, agree, diff, steps, ms in rows:
        print(f"| {name} | {bits} | {opt} | {top1:.2f} | {ref1:.2f} | {agree:.2f} % | {diff:g} ({steps:g}) | "
              + ("–" if ms is None else f"{ms:.3f}") + " |")


if __name__ == "__main__":
    main()
