"""Real check of zsq_fast.quantize: CIFAR-10 ResNet-20, W4A4, real calibration images.

Calibrates on the first N images of ../shared/data/cifar10_train_subset.npz, then prints, for nearest
rounding, AdaRound and BRECQ: top-1 on cifar10_test_exact1017.npz (exact pixels) and top-1 agreement
with the float model on cifar10_test.npz (10k JPEG-reconstructed images). Iteration counts are
printed with the table (reduced from BRECQ's 20000 so the script runs on CPU in ~10 minutes).

    python benchmarks/quantize_check.py [--data ../shared/data] [--iters-adaround 500] [--iters-brecq 1000] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import zsq_fast  # noqa: E402
from zsq_fast.data import load_images_for  # noqa: E402
from zsq_fast.models import resnet20  # noqa: E402
from zsq_fast.models.zoo import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

def load_npz(path: Path, n: int | None = None):
    """(images ImageNet-normalized, labels) of the first n images of an npz, via the package's loader."""
    data = load_images_for(str(path), IMAGENET_MEAN, IMAGENET_STD, 32, limit=n)
    return data.take(torch.arange(data.n))


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--preset", default="hw")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--iters-adaround", type=int, default=500, help="iterations per layer")
    ap.add_argument("--iters-brecq", type=int, default=1000, help="iterations per block")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam lr on V (BRECQ uses 1e-3 for 20000 iterations)")
    ap.add_argument("--methods", default="nearest,adaround,brecq")
    ap.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP stalls on a shared machine")
    args = ap.parse_args()
    if not (args.data / "weights" / "cifar10_resnet20.pt").exists():
        print(f"skipped: real data not found at {args.data}")
        return
    torch.set_num_threads(args.threads)
    model = resnet20()
    model.load_state_dict(torch.load(args.data / "weights" / "cifar10_resnet20.pt", map_location="cpu",
                                     weights_only=True))
    model.eval()
    calib, _ = load_npz(args.data / "cifar10_train_subset.npz", args.calib)
    x_exact, y_exact = load_npz(args.data / "cifar10_test_exact1017.npz")
    x_test, _ = load_npz(args.data / "cifar10_test.npz")
    fp_exact = predict(model, x_exact)
    fp_test = predict(model, x_test)
    rows = [("FP32", "-", "-", (fp_exact == y_exact).float().mean().item() * 100, 100.0, 0.0)]
    iters = {"nearest": None, "adaround": args.iters_adaround, "brecq": args.iters_brecq}
    for method in args.methods.split(","):
        t0 = time.time()
        q = zsq_fast.quantize(model, calib, args.bits, preset=args.preset, method=method,
                              iterations=iters[method], batch_size=args.batch_size, lr=args.lr, seed=0)
        t_q = time.time() - t0
        acc = (predict(q, x_exact) == y_exact).float().mean().item() * 100
        agree = (predict(q, x_test) == fp_test).float().mean().item() * 100
        units = q.quant_config["units"]
        kinds = [u["kind"] for u in units]
        unit_txt = (f"{kinds.count('block')} blocks + {kinds.count('layer')} layers, {iters[method]} each"
                    if units else "-")
        rows.append((method, unit_txt, args.batch_size if units else "-", acc, agree, t_q))
        print(f"done {method}: top-1 {acc:.2f} %, agreement {agree:.2f} %, quantize {t_q:.0f} s", flush=True)
    print(f"\nCIFAR-10 ResNet-20, {args.bits} preset={args.preset}, {calib.shape[0]} real calibration images "
          f"(cifar10_train_subset), calibration=mse, Adam lr on V={args.lr}, torch threads={args.threads}, ops backend="
          f"{zsq_fast.ops.backend()['fake_quant']['cpu']}")
    print("| method | reconstruction (units x iterations) | batch | top-1 exact1017 (%) "
          "| agreement with FP on cifar10_test (%) | quantize time (s) |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.0f} |")


if __name__ == "__main__":
    main()
