"""Scale benchmark: DGH generation cost and memory against N, exact and stale, host and disk stores.

For each (model, N, aggregation, store): a few timed steps; reported are the wall time per
image-iteration (timed steps' wall time / (N x steps); setup, the initial and final whole-set passes
excluded), the same with the process' CPU time of the steps (all its threads; steadier than wall time on
a loaded machine, blind to waiting for the disk), the setup time and the process' peak RSS. Each configuration runs in its own process (its
peak RSS is its own); disk runs use a run folder under --folder, removed afterwards. The store streams
through generate/streaming.py (disk: a read-ahead / write-behind I/O thread); --no-overlap measures
the plain path (rows "disk (plain)").

Grids: "smoke" (digits CNN 16 px, N = 32 and 96, 1 step: seconds; tests/test_scale_benchmark.py runs it
in-process), "cpu" (digits CNN 16 px to N = 10^6, ResNet-20 32 px to 10^5; --max-n caps it).

    python benchmarks/scale.py [--grid cpu] [--max-n 100000] [--iterations 2] [--threads 1] [--folder DIR]
                               [--no-overlap] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io as _io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (model, image size, N values)
GRIDS = {
    "smoke": [("digits_cnn", 16, [32, 96])],
    "cpu": [("digits_cnn", 16, [10**3, 10**4, 10**5, 10**6]), ("resnet20", 32, [10**3, 10**4, 10**5])],
}
MODES = ("exact", "stale")
STORES = ("host", "disk")


def _model(name: str):
    from zsq_fast.models.zoo import load_model

    weights = os.path.join(ROOT, "..", "shared", "data", "weights", f"cifar10_{name}.pt")
    torch.manual_seed(0)  # the same random init (digits CNN) in every configuration
    return load_model(name, weights if os.path.exists(weights) else None)


def one(cfg: dict) -> dict:
    """One generate() call on the CPU; returns its timings and peak RSS."""
    from zsq_fast.generate import dgh, generate, streaming

    torch.set_num_threads(cfg["threads"])
    streaming.OVERLAP = cfg.get("overlap", True)
    cpu = []  # process CPU seconds of each step (all threads): on a shared machine steadier than wall time
    io = {"store_io_s": 0.0, "io_waited_s": 0.0}  # disk: time in file reads/writes, and the part not overlapped
    profile = cProfile.Profile() if cfg.get("profile") else None

    def timed(step):
        def run_step(run, views):
            t, io0 = time.process_time(), (getattr(run.store, "io_s", 0.0), getattr(run.stream, "waited_s", 0.0))
            if profile is not None:
                profile.enable()
            losses = step(run, views)
            if profile is not None:
                profile.disable()
            cpu.append(time.process_time() - t)
            io["store_io_s"] += getattr(run.store, "io_s", 0.0) - io0[0]
            io["io_waited_s"] += getattr(run.stream, "waited_s", 0.0) - io0[1]
            return losses
        return run_step
    steps = dgh.exact_step, dgh.stale_step
    dgh.exact_step, dgh.stale_step = timed(dgh.exact_step), timed(dgh.stale_step)
    src = _model(cfg["model"])
    folder = None
    if cfg["store"] == "disk":
        folder = tempfile.mkdtemp(prefix="zsq_scale_", dir=cfg.get("folder"))
    try:
        _, rec = generate(src.model, cfg["n"], "dgh", cfg["size"], iterations=cfg["iterations"],
                          chunk_size=cfg["chunk"], aggregation=cfg["mode"], mean=src.mean, std=src.std,
                          device="cpu", seed=0, store=cfg["store"], checkpoint=folder)
    finally:
        dgh.exact_step, dgh.stale_step = steps
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    t = rec.timings
    return {**cfg, "us_per_image_iteration": 1e6 * t["steps_s"] / (cfg["n"] * cfg["iterations"]),
            "cpu_us_per_image_iteration": 1e6 * sum(cpu) / (cfg["n"] * cfg["iterations"]),
            "step_cpu_s": cpu, **io, **({"profile": _top(profile)} if profile is not None else {}),
            "setup_s": t["setup_s"], "final_s": t["final_s"], "total_s": t["total_s"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bn_loss": [rec.initial_bn_loss, rec.final_bn_loss]}


def _top(profile: cProfile.Profile, lines: int = 30) -> str:
    out = _io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def stale_bookkeeping(chunk_counts=(100, 200, 400, 3907), channels=(3, 16, 32, 32, 64), max_old: int = 400) -> str:
    """Seconds per step of stale mode's "all chunks but j" statistics alone (no model): the running totals
    (one un-merge + merge per chunk and layer) against merging the K - 1 other chunks for every chunk
    (before issue 10). channels: the digits CNN's input + BN layers; 3907 chunks = 10^6 images / 256."""
    import time

    from zsq_fast.generate.stale_cache import StaleCache
    from zsq_fast.ops import ChannelStats

    def all_others(chunks, j, layer):
        total = ChannelStats(0.0, data=torch.zeros_like(chunks[0][layer].data))
        for k, c in enumerate(chunks):
            if k != j:
                total = total.merge(c[layer])
        return total

    rows = ["| chunks K | running totals s / step | merge all others s / step |", "| ---: | ---: | ---: |"]
    for k in chunk_counts:
        g = torch.Generator().manual_seed(0)
        chunks = [[ChannelStats(4096.0, torch.randn(c, generator=g), 4096 * torch.rand(c, generator=g))
                   for c in channels] for _ in range(k)]
        cache = StaleCache.from_chunks(chunks)
        t = time.perf_counter()
        cache.resync()
        for j in range(k):
            cache.replace(j, chunks[j], cache.others(j))
        new = time.perf_counter() - t
        old = "not run"
        if k <= max_old:
            t = time.perf_counter()
            for j in range(k):
                [all_others(chunks, j, layer) for layer in range(len(channels))]
            old = f"{time.perf_counter() - t:.2f}"
        rows.append(f"| {k} | {new:.3f} | {old} |")
    return "\n".join(rows)


def _child(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-W", "ignore", os.path.abspath(__file__), "--one", json.dumps(cfg)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"over {timeout:.0f} s"}
    if r.returncode != 0:
        return {**cfg, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def plan(grid: str, max_n: int | None, iterations: int, chunk: int, threads: int, folder: str | None,
         min_n: int = 0, models=None, modes=MODES, stores=STORES, overlap: bool = True) -> list[dict]:
    return [{"model": m, "size": size, "n": n, "mode": mode, "store": store, "iterations": iterations,
             "chunk": chunk, "threads": threads, "folder": folder, "overlap": overlap}
            for m, size, ns in GRIDS[grid] if models is None or m in models
            for n in ns if min_n <= n and (max_n is None or n <= max_n)
            for mode in modes for store in stores]


def markdown(rows: list[dict], label: str) -> str:
    out = [f"### Scale ({label})", "",
           "| model | size | N | mode | store | steps | us / image-iteration | CPU us / image-iteration | setup s "
           "| peak RSS MiB | BN loss |",
           "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        store = r["store"] + ("" if r.get("overlap", True) else " (plain)")
        head = f"| {r['model']} | {r['size']} | {r['n']} | {r['mode']} | {store} | {r['iterations']} |"
        if "error" in r:
            out.append(f"{head} failed: {r['error']} | | | | |")
        else:
            out.append(f"{head} {r['us_per_image_iteration']:.1f} | {r['cpu_us_per_image_iteration']:.1f} | "
                       f"{r['setup_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                       f"{r['bn_loss'][0]:.3f} -> {r['bn_loss'][1]:.3f} |")
    return "\n".join(out)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    p.add_argument("--max-n", type=int, default=None)
    p.add_argument("--min-n", type=int, default=0)
    p.add_argument("--models", nargs="+", default=None, help="only these models of the grid")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    p.add_argument("--stores", nargs="+", choices=STORES, default=STORES)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-overlap", action="store_true",
                   help="the plain store path (no read-ahead / write-behind thread, no CUDA side stream)")
    p.add_argument("--profile", action="store_true", help="cProfile the timed steps (JSON lines on stderr)")
    p.add_argument("--folder", default=None, help="where disk runs put their run folders (default: temp dir)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--in-process", action="store_true", help="no child processes (peak RSS is then shared)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--stale-bookkeeping", action="store_true", help="only time stale mode's statistics bookkeeping")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stale_bookkeeping:
        torch.set_num_threads(a.threads)
        text = stale_bookkeeping()
        print(text)
        return text
    if a.one is not None:
        print(json.dumps(one(json.loads(a.one))))
        return ""
    cfgs = plan(a.grid, a.max_n, a.iterations, a.chunk, a.threads, a.folder, a.min_n, a.models, a.modes, a.stores,
                not a.no_overlap)
    for cfg in cfgs:
        cfg["profile"] = a.profile
    rows = []
    for cfg in cfgs:
        rows.append(one(cfg) if a.in_process else _child(cfg, a.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    label = (f"grid {a.grid}, CPU, torch threads {a.threads}, chunk {a.chunk}, {a.iterations} timed steps, seed 0"
             + (", in-process (peak RSS shared)" if a.in_process else ""))
    text = markdown(rows, label)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
