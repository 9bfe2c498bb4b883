"""Speed benchmark: generation throughput and peak memory against N, reconstruction time per block.

1. DGH generation, exact and stale whole-set statistics, on the CIFAR ResNet-20 at 32 px and a
   randomly initialized torchvision ResNet-18 at 224 px: image-iterations per second (N x timed
   steps / their wall time, setup excluded) and peak memory, for several N. Each configuration runs
   in its own process so its peak memory (CUDA allocator peak, or the process' peak RSS on CPU) is
   its own.
2. BRECQ on ResNet-20 at W4A4 hw: seconds per reconstruction unit (block) and per iteration.
3. On a GPU only: ResNet-18 at 224 px, 1024 images x 1000 iterations of DGH (exact), end to end.

    python benchmarks/speed.py [--quick] [--device auto] [--out benchmarks/results_speed.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zsq_fast.report import RunReport, resolve_device  # noqa: E402

# (model, image size, N values) per device kind
GEN_GRID = {
    "cpu": [("resnet20", 32, [64, 256, 1024]), ("torchvision:resnet18", 224, [8, 32])],
    "quick": [("resnet20", 32, [32, 128]), ("torchvision:resnet18", 224, [4])],
    "cuda": [("resnet20", 32, [256, 1024, 4096, 16384]), ("torchvision:resnet18", 224, [64, 256, 1024])],
    "tiny": [("resnet20", 32, [8])],  # a dry run of the script (benchmarks/gpu_check.sh in CI)
}


def _model(name: str):
    from zsq_fast.models.zoo import load_model

    weights = os.path.join(ROOT, "..", "shared", "data", "weights", f"cifar10_{name}.pt")
    return load_model(name, weights if name.startswith("resnet") and os.path.exists(weights) else None)


def one_generation(cfg: dict) -> dict:
    """Runs in a child process: one generate() call; returns throughput and peak memory."""
    from zsq_fast.generate import generate
    from zsq_fast.report import peak_memory

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    src = _model(cfg["model"])
    model = src.model.to(device)
    # warm-up (kernel selection, allocator, thread pools) on a small problem, not timed
    generate(model, min(cfg["n"], 8), method="dgh", image_size=cfg["size"], iterations=1,
                      chunk_size=min(cfg["chunk"], 8), aggregation=cfg["mode"], mean=src.mean, std=src.std,
                      device=device, seed=1)
    images, rec = generate(model, cfg["n"], method="dgh", image_size=cfg["size"], iterations=cfg["iterations"],
                           chunk_size=cfg["chunk"], aggregation=cfg["mode"], mean=src.mean, std=src.std,
                           device=device, seed=0, amp=cfg.get("amp"), store=cfg.get("store", "host"),
                           channels_last=cfg.get("channels_last", False))
    t = rec.timings
    mem = peak_memory(device)
    return {**cfg, "steps_s": t["steps_s"], "setup_s": t["setup_s"], "total_s": t["total_s"],
            "img_it_per_s": cfg["n"] * cfg["iterations"] / t["steps_s"],
            "peak_mib": mem.get("cuda_peak_allocated_mib", mem["process_peak_rss_mib"]),
            "peak_kind": "CUDA allocated" if "cuda_peak_allocated_mib" in mem else "process RSS",
            "bn_loss": [rec.initial_bn_loss, rec.final_bn_loss]}


def _child(cfg: dict, timeout: int) -> dict:
    cmd = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--one", json.dumps(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        return {**cfg, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def reconstruction_per_block(device, n_images: int, iterations: int, progress: bool) -> list[dict]:
    """BRECQ W4A4 hw on ResNet-20 with random calibration images; wall time of each unit."""
    from zsq_fast.quantize import quantize

    src = _model("resnet20")
    calib = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    marks: list[tuple[str, float]] = []

    def on_progress(step, total, info):
        unit = info.get("unit")
        if unit is not None and (not marks or marks[-1][0] != unit):
            marks.append((unit, time.perf_counter()))

    t0 = time.perf_counter()
    q = quantize(src.model, calib, bits="W4A4", preset="hw", method="brecq", iterations=iterations,
                          batch_size=32, device=device, progress=on_progress)
    end = time.perf_counter()
    rows = []
    for i, (unit, t) in enumerate(marks):
        t_next = marks[i + 1][1] if i + 1 < len(marks) else end
        rows.append({"unit": unit, "seconds": round(t_next - t, 3),
                     "ms_per_iteration": round(1e3 * (t_next - t) / iterations, 2)})
    kinds = {u["name"]: u["kind"] for u in q.quant_config["units"]}
    for r in rows:
        r["kind"] = kinds.get(r["unit"], "?")
    rows.append({"unit": "(total, incl. calibration)", "seconds": round(end - t0, 3), "ms_per_iteration": None,
                 "kind": ""})
    return rows


def markdown(gen: list[dict], recon: list[dict], recon_cfg: dict, e2e: dict | None, env: dict) -> str:
    out = ["## Speed (benchmarks/speed.py)", "",
           f"Device: {env['device']}; torch threads {env['threads']}; ops backend {env['backend']}.", "",
           "### DGH generation throughput (image-iterations per second; setup excluded)", "",
           "| model | size | N | chunk | mode | iterations timed | img-it/s | steps s | peak MiB | memory |",
           "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for g in gen:
        if "error" in g:
            out.append(f"| {g['model']} | {g['size']} | {g['n']} | {g['chunk']} | {g['mode']} | "
                       f"{g['iterations']} | failed: {g['error']} | | | |")
            continue
        out.append(f"| {g['model']} | {g['size']} | {g['n']} | {g['chunk']} | {g['mode']} | {g['iterations']} | "
                   f"{g['img_it_per_s']:.1f} | {g['steps_s']:.2f} | {g['peak_mib']:.0f} | {g['peak_kind']} |")
    out += ["", f"### BRECQ reconstruction per unit (ResNet-20, W4A4 hw, {recon_cfg['n']} calibration images, "
            f"{recon_cfg['iterations']} iterations per unit, batch 32)", "",
            "Seconds: from a unit's first step to the next unit's first step (so they include capturing "
            "the next unit's inputs).", "",
            "| unit | kind | seconds | ms / iteration |", "| --- | --- | ---: | ---: |"]
    for r in recon:
        ms = "" if r["ms_per_iteration"] is None else f"{r['ms_per_iteration']:.2f}"
        out.append(f"| {r['unit']} | {r['kind']} | {r['seconds']:.2f} | {ms} |")
    if e2e is not None:
        out += ["", f"### ResNet-18, 224 px, 1024 images, DGH exact, bf16 autocast, channels_last, {e2e.get('store', 'host')} store, "
                f"{e2e['iterations']} iterations timed", ""]
        if "error" in e2e:
            out.append(f"failed: {e2e['error']}")
        else:
            out.append(f"{e2e['total_s']:.1f} s total ({e2e['img_it_per_s']:.0f} image-iterations/s), "
                       f"peak {e2e['peak_mib']:.0f} MiB ({e2e['peak_kind']}).")
            if e2e["iterations"] < 1000:
                est = e2e["setup_s"] + e2e["steps_s"] * 1000 / e2e["iterations"]
                out.append(f"**Extrapolated** to 1000 iterations (setup + steps x 1000/{e2e['iterations']}): "
                           f"{est:.1f} s.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--iterations", type=int, help="timed generation steps per configuration")
    p.add_argument("--recon-iterations", type=int)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--e2e-iterations", type=int, default=1000,
                   help="timed steps of the GPU end-to-end run (fewer are extrapolated to 1000, labelled)")
    p.add_argument("--tiny", action="store_true", help="smallest settings: a dry run of the script")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results_speed.md"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_generation(json.loads(args.one))))
        return 0

    import zsq_fast.ops

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    grid = GEN_GRID["tiny" if args.tiny else ("cuda" if cuda else ("quick" if args.quick else "cpu"))]
    iters = args.iterations or (1 if args.tiny else (20 if cuda else (3 if args.quick else 5)))
    gen = []
    for model, size, ns in grid:
        for n in ns:
            for mode in ("exact", "stale"):
                cfg = {"model": model, "size": size, "n": n, "mode": mode, "iterations": iters,
                       "chunk": min(n, 256 if size <= 64 else (128 if cuda else 16)), "device": str(device),
                       "threads": args.threads}
                gen.append(_child(cfg, timeout=3600))
                g = gen[-1]
                print(f"{model} {size}px N={n} {mode}: " + (g.get("error") or
                      f"{g['img_it_per_s']:.1f} img-it/s, peak {g['peak_mib']:.0f} MiB"), file=sys.stderr)
    recon_cfg = {"n": 16 if args.tiny else (1024 if cuda else (64 if args.quick else 256)),
                 "iterations": args.recon_iterations or (1 if args.tiny else (200 if cuda else (5 if args.quick else 20)))}
    recon = reconstruction_per_block(device, recon_cfg["n"], recon_cfg["iterations"], progress=False)
    e2e = None
    if cuda and not args.skip_e2e and not args.tiny:
        e2e = _child({"model": "torchvision:resnet18", "size": 224, "n": 1024, "mode": "exact",
                      "iterations": args.e2e_iterations, "chunk": 256, "device": str(device), "threads": args.threads,
                      "amp": "bf16", "store": "device", "channels_last": True}, timeout=7200)
    env = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "threads": args.threads,
           "backend": json.dumps(zsq_fast.ops.backend())}
    md = markdown(gen, recon, recon_cfg, e2e, env)
    with open(args.out, "w") as f:
        f.write(md)
    report = RunReport("benchmarks/speed.py", vars(args) | {"device": str(device)},
                       metrics={"generation": gen, "reconstruction": recon, "e2e": e2e, "environment": env})
    report.write(os.path.splitext(args.out)[0] + ".json", device)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
