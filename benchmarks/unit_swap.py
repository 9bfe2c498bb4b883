"""Where a data-free calibration set loses accuracy: unit by unit, against real data (CIFAR-10, CPU).

Quantizes one model twice with BRECQ at the same bits and seed, once on real training images and once on a
generated set (the rows of accuracy.py), then:
  * unit error: for every reconstruction unit, the relative squared error of its quantized output against the
    float model's (sum over the set / sum of the float output's squares), on held-out real test images and on
    the model's own calibration images: a unit that fits its calibration images but not real ones over-fits
    them;
  * swap in: the data-free model with one unit's quantized parameters (integer weights, weight and activation
    scales of the unit, its output sites and the input sites it learned) taken from the real-data model, and the same for every unit up to
    and including it (prefix): agreement with the float model on real test images. The units whose swap
    closes most of the gap are where the generated images fall short.

    python benchmarks/unit_swap.py --model resnet20 --bits W2A4 --source dgh_exact --seed 0 [--threads 1]

Counts default to accuracy.py's full CPU setting (256 images, 500 generation iterations, BRECQ 2000 per unit).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import RECON_LR, calibration  # noqa: E402
from zsq_fast.data import load_images_for  # noqa: E402
from zsq_fast.evaluate import agreement, predict_logits  # noqa: E402
from zsq_fast.models.zoo import load_model  # noqa: E402
from zsq_fast.pipeline import run_quantize  # noqa: E402
from zsq_fast.quantize.brecq import unit_owns_site  # noqa: E402
from zsq_fast.report import seed_everything  # noqa: E402


def unit_keys(qmodel, unit: dict) -> list[str]:
    """The state-dict entries that a unit's reconstruction set: its layers' (model.<unit>.*) and its sites (as
    brecq.unit_owns_site, and the input sites it learned: brecq.input_sites). A layer reading another unit's site
    holds that site's quantizer as its input quantizer, which the state dict lists under the layer too: those
    entries are left to the site's own unit. The output quantizer is set after every unit (calibrate_output): no
    unit's."""
    name, act, entry = unit["name"], unit.get("with_activation"), set(unit.get("input_sites", []))
    sites = {str(i) for i, s in enumerate(qmodel.quant_config.get("sites", []))
             if unit_owns_site(name, s["name"], act) or s["name"] in entry}
    state = qmodel.state_dict()
    foreign = {state[k].data_ptr() for k in state
               if k.startswith("site_quantizers.") and k.split(".")[1] not in sites}
    keys = []
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "site_quantizers" and parts[1] in sites:
            keys.append(k)
        elif k.startswith(f"model.{name}.") and v.data_ptr() not in foreign:
            keys.append(k)
    return keys


def swapped(target, donor, keys: list[str]):
    """A copy of target with the entries `keys` copied from donor."""
    out = copy.deepcopy(target)
    sd, donor_sd = out.state_dict(), donor.state_dict()
    with torch.no_grad():
        for k in keys:
            sd[k].copy_(donor_sd[k])
    return out


def unit_outputs(model, names: list[str], x: torch.Tensor, batch: int = 250) -> dict[str, torch.Tensor]:
    """Every named module's output on x (float32, CPU)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    calls = -(-x.shape[0] // batch)
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got[n].append(o.detach().float()))
             for n in names]
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch):
                model(x[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    for n, v in got.items():
        if len(v) != calls:
            raise SystemExit(f"{n} ran {len(v)} times for {calls} batches: one output per forward is needed")
    return {n: torch.cat(v) for n, v in got.items()}


def relative_errors(qmodel, fp_model, units: list[dict], x: torch.Tensor) -> dict[str, float]:
    """Per unit: sum (q - fp)^2 / sum fp^2 of its output (a layer with its fused activation: the activation's)."""
    out_names = [u.get("with_activation") or u["name"] for u in units]
    q = unit_outputs(qmodel.model, out_names, x)
    f = unit_outputs(fp_model, out_names, x)
    return {u["name"]: float(((q[n] - f[n]) ** 2).sum() / (f[n] ** 2).sum().clamp_min(1e-12))
            for u, n in zip(units, out_names)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", default="W2A4")
    ap.add_argument("--preset", default="hw")
    ap.add_argument("--source", default="dgh_exact", help="the data-free row of accuracy.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--gen-iterations", type=int, default=500)
    ap.add_argument("--recon-iterations", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=2000, help="real test images (cifar10_test, JPEG) for the measures")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results_unit_swap.json"))
    args = ap.parse_args(argv)
    weights = os.path.join(args.data, "weights", f"cifar10_{args.model}.pt")
    if not os.path.exists(weights):
        print(f"skipped: real data not found at {args.data}")
        return 0
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    src = load_model(args.model, weights)
    train = load_images_for(os.path.join(args.data, "cifar10_train_subset.npz"), src.mean, src.std, src.input_size)
    test_set = load_images_for(os.path.join(args.data, "cifar10_test.npz"), src.mean, src.std, src.input_size,
                               limit=args.eval)
    test, _ = test_set.take(torch.arange(test_set.n))
    cfg = {"n_images": args.n_images, "gen_iterations": args.gen_iterations, "device": "cpu", "chunk_size": 256}
    lr = RECON_LR["long" if args.recon_iterations >= 10000 else "short"]
    ref = predict_logits(src.model, test_set)
    t0 = time.perf_counter()
    models, calib, base = {}, {}, {}
    for row in ("real", args.source):
        calib[row], _ = calibration(src, train, row, args.seed, cfg, progress=False)
        models[row] = run_quantize(src, calib[row], bits=args.bits, preset=args.preset, method="brecq",
                                   device=torch.device("cpu"), seed=args.seed, precision="fp32",
                                   iterations=args.recon_iterations, batch_size=32, progress=False, report=None,
                                   extra={"lr": lr, "qdrop": 0.0})
        base[row] = 100 * agreement(predict_logits(models[row], test_set), ref)
        print(f"{row}: agreement {base[row]:.2f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    real, free = models["real"], models[args.source]
    units = free.quant_config["units"]
    if [u["name"] for u in units] != [u["name"] for u in real.quant_config["units"]]:
        raise SystemExit("the two models were reconstructed in different units")
    err = {"real_model_on_test": relative_errors(real, src.model, units, test),
           "free_model_on_test": relative_errors(free, src.model, units, test),
           "real_model_on_own_calib": relative_errors(real, src.model, units, calib["real"]),
           "free_model_on_own_calib": relative_errors(free, src.model, units, calib[args.source])}
    rows, prefix = [], []
    for u in units:
        keys = unit_keys(free, u)
        prefix += keys
        one = 100 * agreement(predict_logits(swapped(free, real, keys), test_set), ref)
        upto = 100 * agreement(predict_logits(swapped(free, real, prefix), test_set), ref)
        rows.append({"unit": u["name"], "swap_one": one, "swap_prefix": upto,
                     **{k: v[u["name"]] for k, v in err.items()}})
    state = free.state_dict()
    covered = {state[k].data_ptr() for k in prefix}  # a site's quantizer is also listed under its readers
    rest = [k for k in state if state[k].data_ptr() not in covered]  # set by no unit: the output quantizer
    whole = 100 * agreement(predict_logits(swapped(free, real, prefix + rest), test_set), ref)
    if abs(whole - base["real"]) > 1e-9:
        raise SystemExit(f"swapping every entry gave {whole:.2f}, not the real-data model's {base['real']:.2f}")
    site_names = [s["name"] for s in free.quant_config.get("sites", [])]
    site_ptrs = {state[k].data_ptr() for k in rest if k.startswith("site_quantizers.")}
    rest_names = sorted({site_names[int(k.split(".")[1])] if k.startswith("site_quantizers.") else k.rsplit(".", 1)[0]
                         for k in rest if k.startswith("site_quantizers.") or state[k].data_ptr() not in site_ptrs})
    rows.append({"unit": f"rest (set by no unit: {', '.join(rest_names) or 'none'})",
                 "swap_one": 100 * agreement(predict_logits(swapped(free, real, rest), test_set), ref),
                 "swap_prefix": whole, **{k: float("nan") for k in err}})
    result = {"args": vars(args), "agreement": base, "units": rows, "seconds": round(time.perf_counter() - t0, 1),
              "threads": args.threads}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{args.model} {args.bits} {args.preset}, seed {args.seed}, {args.n_images} images, {args.source} "
          f"{args.gen_iterations} generation iterations, BRECQ {args.recon_iterations} per unit; agreement with "
          f"the float model on {args.eval} cifar10_test images: real {base['real']:.2f}, "
          f"{args.source} {base[args.source]:.2f}\n")
    print(f"| unit | {args.source} + this unit from real | + every unit up to it from real | rel. error real model "
          f"(test / own calib) | rel. error {args.source} model (test / own calib) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['unit']} | {r['swap_one']:.2f} | {r['swap_prefix']:.2f} | {r['real_model_on_test']:.4f} / "
              f"{r['real_model_on_own_calib']:.4f} | {r['free_model_on_test']:.4f} / "
              f"{r['free_model_on_own_calib']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
