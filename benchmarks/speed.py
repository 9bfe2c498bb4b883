"""Speed benchmark: generation throughput and peak memory against N, reconstruction time per block.

1. DGH generation, exact and stale whole-set statistics, on the CIFAR ResNet-20 at 32 px and a
   randomly initialized torchvision ResNet-18 at 224 px: image-iterations per second (N x timed
   steps / their wall time, setup excluded) and peak memory, for several N, with the ratios of the
   largest N to the smallest (memory flat in N, time per image-iteration flat in N). On a GPU the
   ResNet-20 rows are issue 9's: host store, chunk 256, N = 1024, 16384, 131072. Each configuration
   runs in its own process so its peak memory (CUDA allocator peak, or the process' peak RSS on CPU)
   is its own.
2. BRECQ at W4A4 hw: seconds per reconstruction unit (block) and ms per iteration, with the fused
   AdaRound kernel and with the eager formula + regularizer under autograd (the reference path), side
   by side; the whole model extrapolated to 20000 iterations per unit (labelled). ResNet-18 at 224 px
   (batch 32) on a GPU, ResNet-20 on a CPU.
3. On a GPU only: ResNet-18 at 224 px, 1024 images x 1000 iterations of DGH, bf16 autocast,
   channels_last: exact with the device store, stale with the device store, exact with the host
   store (pinned, streamed), end to end; then a profile of one step of each: where its time goes
   (views, forward, backward, optimizer, the exact statistics pass, host<->device copies).

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
    "cuda": [("resnet20", 32, [1024, 16384, 131072]), ("torchvision:resnet18", 224, [64, 256, 1024])],
    "tiny": [("resnet20", 32, [8])],  # a dry run of the script (benchmarks/gpu_check.sh in CI)
}


def _model(name: str):
    from zsq_fast.models.zoo import load_model

    weights = os.path.join(ROOT, "..", "shared", "data", "weights", f"cifar10_{name}.pt")
    return load_model(name, weights if name.startswith("resnet") and os.path.exists(weights) else None)


# where a step's time goes: the generator's functions, each wrapped in a profiler range named after its part
# ("statistics pass" is exact mode's pass 1 and includes the views and forwards it runs)
STEP_PARTS = {
    "views": ("zsq_fast.generate.dgh", "see"),
    "forward": ("zsq_fast.generate.dgh", "forward"),
    "backward": ("zsq_fast.generate.dgh", "grad_of"),
    "optimizer": ("zsq_fast.generate.dgh", "update"),
    "statistics pass": ("zsq_fast.generate.dgh", "whole_set_bn"),
    "host->device": ("zsq_fast.generate.streaming", "ChunkStream._to_device"),
    "device->host": ("zsq_fast.generate.streaming", "ChunkStream.put"),
}


def _wrap_step_parts() -> None:
    import importlib

    for part, (module, attr) in STEP_PARTS.items():
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        fn = getattr(owner, name)

        def wrapped(*args, _fn=fn, _range=f"step:{part}", **kwargs):
            with torch.profiler.record_function(_range):
                return _fn(*args, **kwargs)

        setattr(owner, name, wrapped)


def _device_us(e, self_only: bool = False) -> float:
    """Device (kernel) microseconds of a profiler event or average, across torch versions."""
    names = ("self_device_time_total", "self_cuda_time_total") if self_only else ("device_time_total",
                                                                               "cuda_time_total")
    for n in names:
        if hasattr(e, n):
            return float(getattr(e, n))
    return 0.0


def profile_step(model, src, cfg: dict, device: torch.device, generate) -> dict:
    """A 3-step run of cfg's generation with its parts in profiler ranges; the profiler records step 2 only.
    Returns per part: calls, CPU ms and device ms; the step's wall ms (under the profiler) and its busiest ops."""
    from torch.profiler import ProfilerActivity, profile

    _wrap_step_parts()
    cuda = device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    wall = {}

    def on_step(step, total, losses):
        if cuda:
            torch.cuda.synchronize(device)
        if step == 1:
            prof.start()
            wall["t0"] = time.perf_counter()
        elif step == 2:
            wall["ms"] = 1e3 * (time.perf_counter() - wall["t0"])
            prof.stop()

    generate(model, cfg["n"], method="dgh", image_size=cfg["size"], iterations=3, chunk_size=cfg["chunk"],
             aggregation=cfg["mode"], mean=src.mean, std=src.std, device=device, seed=0, amp=cfg.get("amp"),
             store=cfg.get("store", "host"), channels_last=cfg.get("channels_last", False), progress=on_step)
    parts: dict[str, dict] = {}
    for e in prof.events():
        if e.name.startswith("step:") and e.device_type == torch.autograd.DeviceType.CPU:
            d = parts.setdefault(e.name[5:], {"calls": 0, "cpu_ms": 0.0, "device_ms": 0.0})
            d["calls"] += 1
            d["cpu_ms"] += e.cpu_time_total / 1e3
            d["device_ms"] += _device_us(e) / 1e3
    avgs = [a for a in prof.key_averages() if not a.key.startswith("step:")]
    key = (lambda a: _device_us(a, True)) if cuda else (lambda a: a.self_cpu_time_total)
    top = [{"op": a.key, "calls": a.count, "self_device_ms": round(_device_us(a, True) / 1e3, 3),
            "self_cpu_ms": round(a.self_cpu_time_total / 1e3, 3)} for a in sorted(avgs, key=key, reverse=True)[:10]]
    busy = sum(_device_us(a, True) for a in avgs) / 1e3
    return {"step_wall_ms": round(wall.get("ms", float("nan")), 3), "device_busy_ms": round(busy, 3),
            "parts": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in parts.items()}, "top_ops": top}


def one_generation(cfg: dict) -> dict:
    """Runs in a child process: one generate() call; returns throughput and peak memory."""
    from zsq_fast.generate import generate
    from zsq_fast.report import peak_memory

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    src = _model(cfg["model"])
    model = src.model.to(device)
    if cfg.get("bn_on_noise"):  # a random-init model: BN statistics from noise, so the BN loss has a target
        _bn_on_noise(model, cfg["size"], device)
    # warm-up (kernel selection, allocator, thread pools) on a small problem, not timed
    generate(model, min(cfg["n"], 8), method="dgh", image_size=cfg["size"], iterations=1,
                      chunk_size=min(cfg["chunk"], 8), aggregation=cfg["mode"], mean=src.mean, std=src.std,
                      device=device, seed=1, amp=cfg.get("amp"), channels_last=cfg.get("channels_last", False))
    images, rec = generate(model, cfg["n"], method="dgh", image_size=cfg["size"], iterations=cfg["iterations"],
                           chunk_size=cfg["chunk"], aggregation=cfg["mode"], mean=src.mean, std=src.std,
                           device=device, seed=0, amp=cfg.get("amp"), store=cfg.get("store", "host"),
                           channels_last=cfg.get("channels_last", False))
    t = rec.timings
    mem = peak_memory(device)
    out = {**cfg, "steps_s": t["steps_s"], "setup_s": t["setup_s"], "total_s": t["total_s"],
           "img_it_per_s": cfg["n"] * cfg["iterations"] / t["steps_s"],
           "peak_mib": mem.get("cuda_peak_allocated_mib", mem["process_peak_rss_mib"]),
           "peak_kind": "CUDA allocated" if "cuda_peak_allocated_mib" in mem else "process RSS",
           "bn_loss": [rec.initial_bn_loss, rec.final_bn_loss], "store_chosen": rec.to_dict().get("store"),
           "amp_used": rec.settings["amp"], "channels_last_used": rec.settings["channels_last"],
           "auto": rec.settings.get("auto") or {}}
    if cfg.get("profile"):  # after the timed run and its peak: the profiler's overhead touches neither
        out["profile"] = profile_step(model, src, cfg, device, generate)
    return out


@torch.no_grad()
def _bn_on_noise(model, size: int, device, passes: int = 3, batch: int = 32) -> None:
    """BN running statistics from `passes` train-mode forwards of N(0, 1) images (seeded), then eval mode."""
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(passes):
        model(torch.randn(batch, 3, size, size, generator=g).to(device))
    model.eval()


def _child(cfg: dict, timeout: int) -> dict:
    cmd = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--one", json.dumps(cfg)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:  # a row that hangs is reported, the others still run
        return {**cfg, "error": f"over {timeout} s"}
    if r.returncode != 0:
        return {**cfg, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def eager_adaround(w, v, scale, zero_point=None, *, bits, signed=True, axis=0, hard=False, beta=2.0,
                   compute_reg=True):
    """The AdaRound formula and regularizer as eager PyTorch ops under autograd: what the fused kernel replaces
    (ops.reference.adaround_forward, differentiated by autograd), with adaround_quantize's signature."""
    from zsq_fast.ops import reference
    from zsq_fast.ops.checks import quant_range

    qmin, qmax = quant_range(bits, signed)
    zp = torch.zeros_like(scale) if zero_point is None else zero_point
    return reference.adaround_forward(w.detach(), v, scale.detach(), zp, qmin, qmax, axis, hard, beta, compute_reg)


def reconstruction_per_block(device, model: str, size: int, n_images: int, iterations: int,
                             impl: str = "fused") -> list[dict]:
    """BRECQ W4A4 hw on `model` with random calibration images; wall time of each unit. impl: "fused" (the
    AdaRound kernel) or "eager" (eager_adaround in its place)."""
    from zsq_fast.quantize import modules, quantize

    src = _model(model)
    calib = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    marks: list[dict] = []  # per unit: the times of its first and last reported iterations

    def on_progress(step, total, info):
        unit = info.get("unit")
        if unit is None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now, t = time.perf_counter(), (step - 1) % iterations
        if not marks or marks[-1]["unit"] != unit:
            marks.append({"unit": unit, "first": now, "t_first": t, "last": now, "t_last": t})
        else:
            marks[-1].update(last=now, t_last=t)

    fused = modules.adaround_quantize
    modules.adaround_quantize = fused if impl == "fused" else eager_adaround
    try:
        t0 = time.perf_counter()
        q = quantize(src.model, calib, bits="W4A4", preset="hw", method="brecq", iterations=iterations,
                     batch_size=32, device=device, progress=on_progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    finally:
        modules.adaround_quantize = fused
    rows = []
    for i, m in enumerate(marks):
        t_next = marks[i + 1]["first"] if i + 1 < len(marks) else end
        # between the first and the last reported iteration: the iterations alone, without capturing inputs
        steps = m["t_last"] - m["t_first"]
        per = (m["last"] - m["first"]) / steps if steps > 0 else (t_next - m["first"]) / iterations
        rows.append({"unit": m["unit"], "seconds": round(t_next - m["first"], 3),
                     "ms_per_iteration": round(1e3 * per, 3)})
    kinds = {u["name"]: u["kind"] for u in q.quant_config["units"]}
    for r in rows:
        r["kind"] = kinds.get(r["unit"], "?")
    rows.append({"unit": "(total, incl. calibration)", "seconds": round(end - t0, 3), "ms_per_iteration": None,
                 "kind": ""})
    return rows


def _extrapolated_s(rows: list[dict], iterations: int = 20000) -> float:
    """The whole model at `iterations` per unit from the measured ms per iteration (capture time included)."""
    return sum(r["ms_per_iteration"] for r in rows if r["ms_per_iteration"] is not None) * iterations / 1e3


def _flatness(gen: list[dict]) -> list[str]:
    """Per (model, mode, store): the largest N against the smallest, for time per image-iteration and peak memory."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for g in gen:
        if "error" not in g:
            groups.setdefault((g["model"], g["mode"], g.get("store", "host")), []).append(g)
    for (model, mode, store), rows in groups.items():
        if len(rows) < 2:
            continue
        lo, hi = min(rows, key=lambda g: g["n"]), max(rows, key=lambda g: g["n"])
        t = lo["img_it_per_s"] / hi["img_it_per_s"]
        m = max(g["peak_mib"] for g in rows) / min(g["peak_mib"] for g in rows)
        out.append(f"| {model} | {mode} | {store} | {lo['n']} -> {hi['n']} | {t:.2f}x | {m:.2f}x |")
    if out:
        out = ["", "Flat in N (largest N against the smallest; issue 9 asks <= 1.2x time, peak memory within 10 %):",
               "", "| model | mode | store | N | time per image-iteration | peak memory max/min |",
               "| --- | --- | --- | --- | ---: | ---: |"] + out
    return out


def _profile_md(p: dict) -> list[str]:
    out = [f"One step profiled (step 2 of 3, torch.profiler; wall {p['step_wall_ms']:.1f} ms under the profiler, "
           f"device busy {p['device_busy_ms']:.1f} ms). Parts are the generator's functions; the statistics pass "
           "(exact mode's pass 1) includes its own views and forwards.", "",
           "| part | calls | CPU ms | device ms |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {k} | {v['calls']} | {v['cpu_ms']:.1f} | {v['device_ms']:.1f} |" for k, v in p["parts"].items()]
    out += ["", "| busiest op | calls | self device ms | self CPU ms |", "| --- | ---: | ---: | ---: |"]
    out += [f"| `{t['op'][:60]}` | {t['calls']} | {t['self_device_ms']:.1f} | {t['self_cpu_ms']:.1f} |"
            for t in p["top_ops"]]
    return out


def markdown(gen: list[dict], recon: dict, recon_cfg: dict, e2e: list[dict], env: dict) -> str:
    out = ["## Speed (benchmarks/speed.py)", "",
           f"Device: {env['device']}; torch threads {env['threads']}; ops backend {env['backend']}."]
    if gen:
        out += ["", "### DGH generation throughput (image-iterations per second; setup excluded)", "",
                "| model | size | N | chunk | mode | store | iterations timed | img-it/s | steps s | peak MiB | memory |",
                "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for g in gen:
        head = f"| {g['model']} | {g['size']} | {g['n']} | {g['chunk']} | {g['mode']} | {g.get('store', 'host')} | "
        if "error" in g:
            out.append(head + f"{g['iterations']} | failed: {g['error']} | | | |")
            continue
        out.append(head + f"{g['iterations']} | {g['img_it_per_s']:.1f} | {g['steps_s']:.2f} | {g['peak_mib']:.0f} | "
                   f"{g['peak_kind']} |")
    out += _flatness(gen)
    impls = list(recon)
    out += [] if not impls else ["", f"### BRECQ reconstruction per unit ({recon_cfg['model']}, {recon_cfg['size']} px, W4A4 hw, "
            f"{recon_cfg['n']} random calibration images, {recon_cfg['iterations']} iterations per unit, batch 32)", "",
            "Seconds: from a unit's first step to the next unit's first step (so they include capturing "
            "the next unit's inputs); ms / iteration: between the unit's first and last reported iterations "
            "(iterations only). fused: the AdaRound kernel; eager: the formula + regularizer as eager ops "
            "under autograd (the reference path), run one after the other in this process.", "",
            "| unit | kind | " + " | ".join(f"{i} s | {i} ms / it." for i in impls) + " | eager / fused |",
            "| --- | --- |" + " ---: | ---: |" * len(impls) + " ---: |"]
    for k, r in enumerate(recon[impls[0]] if impls else []):
        cells = []
        for i in impls:
            rr = recon[i][k] if k < len(recon[i]) else {"seconds": float("nan"), "ms_per_iteration": None}
            ms = "" if rr["ms_per_iteration"] is None else f"{rr['ms_per_iteration']:.2f}"
            cells.append(f"{rr['seconds']:.2f} | {ms}")
        ratio = ""
        if "eager" in recon and "fused" in recon and k < len(recon["eager"]) and r["ms_per_iteration"]:
            ratio = f"{recon['eager'][k]['ms_per_iteration'] / r['ms_per_iteration']:.2f}x"
        out.append(f"| {r['unit']} | {r['kind']} | " + " | ".join(cells) + f" | {ratio} |")
    if impls:
        out += ["", "**Extrapolated** to 20000 iterations per unit (sum of ms / iteration x 20000, capture not "
                "included): " +
                ", ".join(f"{i} {_extrapolated_s(recon[i]) / 60:.1f} min" for i in impls) + "."]
    for e in e2e:
        init = ", random init with BN statistics set on noise" if e.get("bn_on_noise") else ""
        out += ["", f"### {e['model']}{init}, {e['size']} px, {e['n']} images, DGH {e['mode']}, bf16 autocast, "
                f"channels_last, {e.get('store', 'host')} store, {e['iterations']} iterations timed", ""]
        if "error" in e:
            out.append(f"failed: {e['error']}")
            continue
        out.append(f"{e['total_s']:.1f} s total ({e['img_it_per_s']:.0f} image-iterations/s, "
                   f"{e['steps_s'] / e['iterations']:.3f} s per step, setup {e['setup_s']:.1f} s), "
                   f"peak {e['peak_mib']:.0f} MiB ({e['peak_kind']}).")
        if e["iterations"] < 1000:
            est = e["setup_s"] + e["steps_s"] * 1000 / e["iterations"]
            out.append(f"**Extrapolated** to 1000 iterations (setup + steps x 1000/{e['iterations']}): {est:.1f} s.")
        if isinstance(e.get("profile"), dict):  # the profile's result (the setting is a bool)
            out += [""] + _profile_md(e["profile"])
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
    p.add_argument("--parts", default="generation,reconstruction,e2e",
                   help="comma list of the parts to run (a GPU call's time limit may not fit all three)")
    p.add_argument("--gen-models", help="generation part: only these models of the grid (comma list)")
    p.add_argument("--gen-n", help="generation part: only these N (comma list)")
    p.add_argument("--gen-modes", default="exact,stale", help="generation part: aggregation modes (comma list)")
    p.add_argument("--recon-images", type=int, help="reconstruction part: calibration images")
    p.add_argument("--recon-impls", default="fused,eager", help="reconstruction part: fused and/or eager (comma list)")
    p.add_argument("--e2e-runs", default="exact:device,stale:device,exact:host",
                   help="end-to-end part: mode:store pairs (comma list)")
    p.add_argument("--no-profile", action="store_true", help="end-to-end part: skip the one-step profile")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per child process (a generation row)")
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
    parts = set(args.parts.split(","))
    if not parts <= {"generation", "reconstruction", "e2e"}:
        raise SystemExit(f"--parts: unknown {sorted(parts - {'generation', 'reconstruction', 'e2e'})}")
    gen = []
    gen_models = None if not args.gen_models else args.gen_models.split(",")
    gen_n = None if not args.gen_n else [int(n) for n in args.gen_n.split(",")]
    for model, size, ns in (grid if "generation" in parts else []):
        if gen_models is not None and model not in gen_models:
            continue
        for n in (ns if gen_n is None else gen_n):
            for mode in args.gen_modes.split(","):
                cfg = {"model": model, "size": size, "n": n, "mode": mode, "iterations": iters, "store": "host",
                       "chunk": min(n, 256 if size <= 64 else (128 if cuda else 16)), "device": str(device),
                       "threads": args.threads}
                gen.append(_child(cfg, timeout=args.timeout))
                g = gen[-1]
                print(f"{model} {size}px N={n} {mode}: " + (g.get("error") or
                      f"{g['img_it_per_s']:.1f} img-it/s, peak {g['peak_mib']:.0f} MiB"), file=sys.stderr)
    if cuda and not args.tiny:  # issue 9: ResNet-18 at 224 px, batch 32
        recon_cfg = {"model": "torchvision:resnet18", "size": 224, "n": args.recon_images or 256,
                     "iterations": args.recon_iterations or 200}
    else:
        recon_cfg = {"model": "resnet20", "size": 32,
                     "n": args.recon_images or (16 if args.tiny else (64 if args.quick else 256)),
                     "iterations": args.recon_iterations or (1 if args.tiny else (5 if args.quick else 20))}
    recon = {impl: reconstruction_per_block(device, recon_cfg["model"], recon_cfg["size"], recon_cfg["n"],
                                            recon_cfg["iterations"], impl)
             for impl in (args.recon_impls.split(",") if "reconstruction" in parts else ())}
    e2e = []
    if "e2e" in parts and ((cuda and not args.skip_e2e) or args.tiny):  # --tiny: the same code path on the dry run's small model
        base = ({"model": "resnet20", "size": 32, "n": 16, "iterations": 2, "chunk": 8} if args.tiny else
                {"model": "torchvision:resnet18", "size": 224, "n": 1024, "iterations": args.e2e_iterations,
                 "chunk": 256})
        for mode, store in (run.split(":") for run in args.e2e_runs.split(",")):
            e2e.append(_child({**base, "mode": mode, "store": store, "device": str(device), "threads": args.threads,
                               "amp": "bf16", "channels_last": True, "profile": not args.no_profile,
                               "bn_on_noise": base["model"].startswith("torchvision:")},  # random init only
                              timeout=min(7200, args.timeout)))
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
