"""The hw preset across torchvision's classification CNNs that have BatchNorm (issue 12's sweep).

Per model: random weights (no download) with BN statistics set by a few train-mode passes on noise; generate
N images with dgh (a few steps); quantize W8A8 `hw` with nearest rounding; export ONNX QDQ; run it through
onnxruntime (default session options) and compare with the fake-quant model (top-1 agreement, max logit
difference in output steps); count the data ops (Add/Concat/Conv/Gemm/MatMul/Mul) with an input that does
not come out of a DequantizeLinear ("float edges", zsq_fast.quantize.onnx_qdq.float_edges; 0 when every
tensor between quantized ops is on an integer grid). Models without BN (ConvNeXt, SqueezeNet, ViT, ...) are listed as refused by the BN generators. A model that fails
shows its error in the table.

    python benchmarks/torchvision_sweep.py --models resnet18,mobilenet_v2 --size 64 --threads 1
    python benchmarks/torchvision_sweep.py --all --max-params 60    # every torchvision CNN with BN, smallest first
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


# the smallest input each architecture accepts (others run at --size); inception_v3's stem needs 75 px, MaxViT's
# 7x7 windows at stride 32 need 224
MIN_SIZE = {"inception_v3": 75, "maxvit_t": 224}


def build(name: str):
    import torchvision

    kw = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=True)
    return getattr(torchvision.models, name)(**kw)


def run_one(name: str, args) -> dict:
    import torchvision

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    params = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]  # ImageNet head; no download
    row = {"model": name, "params_m": round(params / 1e6, 1)}
    if row["params_m"] > args.max_params:
        return {**row, "status": f"not run: {row['params_m']}M parameters > --max-params {args.max_params:g}M"}
    m = build(name)
    if not has_bn(m):
        return {**row, "status": "no BatchNorm: the BN generators refuse it; quantize with real images"}
    size = row["size"] = max(args.size, MIN_SIZE.get(name, 0))
    try:
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.randn(8, 3, size, size))
        m.eval()
        t1 = time.perf_counter()
        images, _ = zsq_fast.generate(m, args.n_images, "dgh", size, iterations=args.gen_iterations,
                                      chunk_size=args.n_images, seed=args.seed)
        row["generate_s"] = round(time.perf_counter() - t1, 1)
        t1 = time.perf_counter()
        q = zsq_fast.quantize(m, images, "W8A8", preset="hw")
        row["quantize_s"] = round(time.perf_counter() - t1, 1)
        row["sites"] = len(q.quant_config["sites"])
        row["bn_as_conv"] = len(q.quant_config["bn_as_conv"])
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "q.onnx")
            zsq_fast.export_onnx(q, path, torch.zeros(1, 3, size, size))
            row["float_edges"] = float_edges(path)
            r = zsq_fast.evaluate_onnx(path, images, reference=q, threads=args.threads)
        row.update(agreement=r["agreement"], max_abs_diff=r["max_abs_logit_diff"],
                   max_logit_diff_steps=r["max_logit_diff_steps"])
        ok = row["float_edges"] == 0 and r["agreement"] == 100.0 and r["max_logit_diff_steps"] <= 1.0
        row["status"] = "pass" if ok else "FAIL"
    except Exception as e:  # noqa: BLE001 - the table shows what fails
        row["status"] = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    row["total_s"] = round(time.perf_counter() - t0, 1)
    return row


COLUMNS = [("model", "model"), ("params_m", "params (M)"), ("size", "px"), ("sites", "sites"),
           ("bn_as_conv", "BN as conv"), ("float_edges", "float edges"), ("agreement", "ORT agreement %"),
           ("max_abs_diff", "ORT max abs diff"), ("max_logit_diff_steps", "max diff (steps)"),
           ("generate_s", "generate s"), ("quantize_s", "quantize s"), ("total_s", "total s"), ("status", "status")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SMALL))
    p.add_argument("--all", action="store_true", help="every torchvision classification model, smallest first")
    p.add_argument("--size", type=int, default=32, help="input size (raised to what a model needs: MIN_SIZE)")
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--gen-iterations", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-params", type=float, default=float("inf"),
                   help="skip (and list) models with more parameters than this, in millions")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision

    if args.all:
        names = torchvision.models.list_models(module=torchvision.models)
        names.sort(key=lambda n: torchvision.models.get_model_weights(n).DEFAULT.meta["num_params"])  # no download
    else:
        names = args.models.split(",")
    print(f"W8A8 hw, nearest; {args.n_images} dgh images × {args.gen_iterations} steps at {args.size}×{args.size} "
          f"(or a model's minimum); seed {args.seed}; torch threads {args.threads}; onnxruntime default session "
          f"options, {args.threads} thread(s)\n")
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for name in names:
        r = run_one(name, args)
        print("| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
