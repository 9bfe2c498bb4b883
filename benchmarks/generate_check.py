"""Real check of the generators on the CIFAR-10 ResNet-20 in ../shared/data.

Generates DGH images (exact whole-set aggregation) and prints, next to Gaussian noise and real
training images: the whole-set BN loss (ALGORITHMS.md §1, lambda_sigma and layer weights of the
run), the FP model's predicted-class histogram and its mean max-softmax.

    python benchmarks/generate_check.py [--n 256] [--iterations 200] [--lr 0.1] [--chunk 128]
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
from zsq_fast.generate import IMAGENET_MEAN, IMAGENET_STD, bn_loss_of  # noqa: E402
from zsq_fast.models import resnet20  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def load_model() -> torch.nn.Module:
    model = resnet20()
    model.load_state_dict(torch.load(DATA / "weights" / "cifar10_resnet20.pt", map_location="cpu",
                                     weights_only=True), strict=True)
    return model.eval()


def real_images(n: int) -> torch.Tensor:
    """The first n images of cifar10_train_subset.npz, ImageNet-normalized (the package's npz loader)."""
    data = load_images_for(str(DATA / "cifar10_train_subset.npz"), IMAGENET_MEAN, IMAGENET_STD, 32, limit=n)
    return data.take(torch.arange(data.n))[0]


@torch.no_grad()
def describe(model, images, lambda_sigma: float) -> dict:
    probs = torch.cat([model(images[i:i + 256]).softmax(1) for i in range(0, len(images), 256)])
    return {"bn_loss": bn_loss_of(model, images, lambda_sigma=lambda_sigma),
            "hist": torch.bincount(probs.argmax(1), minlength=10).tolist(),
            "max_softmax": float(probs.amax(1).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=200, help="reduced from 1000 for CPU")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--aggregation", default="exact")
    ap.add_argument("--odsl-weight", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is much faster than 2 on a shared, loaded 2-core machine")
    args = ap.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} not found")
        return
    torch.set_num_threads(args.threads)
    model = load_model()
    kw = {} if args.lr is None else {"lr": args.lr}
    if args.odsl_weight is not None:
        kw["odsl_weight"] = args.odsl_weight
    t0 = time.perf_counter()
    images, record = zsq_fast.generate(model, args.n, method="dgh", image_size=32, iterations=args.iterations,
                                       chunk_size=args.chunk, aggregation=args.aggregation, seed=args.seed, **kw)
    dt = time.perf_counter() - t0
    s = record.settings
    print(f"DGH ({s['aggregation']}) on CIFAR-10 ResNet-20, CPU {torch.get_num_threads()} threads: n={args.n}, "
          f"iterations={s['iterations']} (reduced from the default 1000), chunk={s['chunk_size']}, lr={s['lr']}, "
          f"lambda_sigma={s['lambda_sigma']}, odsl_weight={s['odsl_weight']}, margin={s['margin']} px, "
          f"{dt:.1f} s ({record.timings['per_step_s']:.2f} s/step)")
    print(f"BN loss during generation: start {record.initial_bn_loss:.4f} -> end {record.final_bn_loss:.4f} "
          f"(final lr {record.losses[-1]['lr'] if record.losses else s['lr']})")
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    at_bound = ((images - lo.view(1, 3, 1, 1)).abs() < 1e-4) | ((images - hi.view(1, 3, 1, 1)).abs() < 1e-4)
    print(f"pixels at the clip bounds: {float(at_bound.float().mean()):.1%}")
    lam = s["lambda_sigma"]
    torch.manual_seed(args.seed)
    rows = [("DGH synthetic", images), ("Gaussian noise", torch.randn(args.n, 3, 32, 32)),
            ("real (train subset)", real_images(args.n))]
    print()
    print(f"| images | n | BN loss (λσ={lam:g}) | predicted-class histogram (0..9) | mean max-softmax |")
    print("|---|---:|---:|---|---:|")
    for name, x in rows:
        d = describe(model, x, lam)
        print(f"| {name} | {len(x)} | {d['bn_loss']:.4f} | {d['hist']} | {d['max_softmax']:.3f} |")


if __name__ == "__main__":
    main()
