"""The hw preset across torchvision's classification CNNs that have BatchNorm (issue 12's sweep).

Per model: random weights (no download) with BN statistics set by a few train-mode passes on noise; generate
N images with dgh (a few steps); quantize W8A8 `hw` with nearest rounding; export ONNX QDQ; run it through
onnxruntime (default session options) and compare with the fake-quant model (top-1 agreement, max logit
difference in output steps); count the data ops (Add/Concat/Conv/Gemm/MatMul/Mul) with an input that does
not come out of a DequantizeLinear ("float edges", zsq_fast.quantize.onnx_qdq.float_edges; 0 when every
tensor between quantized ops is on an integer grid). Models without BN (ConvNeXt, SqueezeNet, ViT, ...) are listed as refused by the BN generators. A model that fails
shows its error in the table.

    python benchmarks/torchvision_sweep.py --models resnet18,mobilenet_v2 --size 64 --threads 1
    python benchmarks/torchvision_sweep.py --all --size 64          # every torchvision CNN with BN (hours on CPU)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq_fast  # noqa: E402

SMALL = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
         "shufflenet_v2_x0_5", "mnasnet0_5", "googlenet", "densenet121"]


def has_bn(m) -> bool:
    return any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())


def float_edges(path: str) -> int:
    import onnx

    from zsq_fast.quantize.onnx_qdq import float_edges as edges
    return len(edges(onnx.load(path)))


def run_one(name: str, args) -> dict:
    import torchvision

    torch.manual_seed(args.seed)
    kw = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=True)
    m = getattr(torchvision.models, name)(**kw)
    if not has_bn(m):
        return {"model": name, "status": "no BatchNorm: the BN generators refuse it; quantize with real images"}
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, args.size, args.size))
    m.eval()
    row = {"model": name}
    t0 = time.perf_counter()
    try:
        images, _ = zsq_fast.generate(m, args.n_images, "dgh", args.size, iterations=args.gen_iterations,
                                      chunk_size=args.n_images, seed=args.seed)
        row["generate_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        q = zsq_fast.quantize(m, images, "W8A8", preset="hw")
        row["quantize_s"] = round(time.perf_counter() - t1, 1)
        row["sites"] = len(q.quant_config["sites"])
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "q.onnx")
            zsq_fast.export_onnx(q, path, torch.zeros(1, 3, args.size, args.size))
            row["float_edges"] = float_edges(path)
            r = zsq_fast.evaluate_onnx(path, images, reference=q, threads=args.threads)
        row.update(agreement=r["agreement"], max_logit_diff_steps=r["max_logit_diff_steps"], status="ok")
    except Exception as e:  # noqa: BLE001 - the table shows what fails
        row["status"] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SMALL))
    p.add_argument("--all", action="store_true", help="every torchvision classification model")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--gen-iterations", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models) if args.all else args.models.split(",")
    print(f"W8A8 hw, nearest; {args.n_images} dgh images × {args.gen_iterations} steps at {args.size}×{args.size}; "
          f"seed {args.seed}; torch threads {args.threads}; onnxruntime default session options\n")
    print("| model | sites | float edges | onnxruntime agreement % | max logit diff (steps) | generate s | quantize s | status |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        r = run_one(name, args)
        print(f"| {r['model']} | {r.get('sites', '')} | {r.get('float_edges', '')} | {r.get('agreement', '')} | "
              f"{r.get('max_logit_diff_steps', '')} | {r.get('generate_s', '')} | {r.get('quantize_s', '')} | "
              f"{r['status']} |", flush=True)


if __name__ == "__main__":
    main()
