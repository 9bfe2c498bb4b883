"""Distributed generation benchmark: throughput of generate() on 1, 2, ... ranks of a torch.distributed
group (gloo on CPU, NCCL on GPUs), and the time each step spends in collectives.

Each configuration spawns `world` processes (a free local port, env:// rendezvous as torchrun sets it
up), each with --threads CPU threads (CPU) or its own GPU (cuda, up to the GPUs present). Reported per
(method, world): the wall time per step (slowest rank), throughput in image-iterations per second
(N x steps / the slowest rank's step time; setup and the initial/final whole-set passes excluded), and
per step (steps 2..n) the time rank 0 spends inside collectives (all-reduces of the statistics and
losses; it includes waiting for the slower rank), their number and the bytes of their tensors, and the
median time of one all-reduce of the statistics' size alone (after a barrier: the transfer's own cost).

    python benchmarks/distributed.py [--model digits_cnn] [--n 512] [--iterations 5] [--chunk 64]
                                     [--worlds 1,2] [--threads 1] [--device cpu|cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = {"dgh-exact": ("dgh", {"aggregation": "exact"}), "dgh-stale": ("dgh", {"aggregation": "stale"}),
           "bns": ("bns", {})}


def _model(name: str):
    from zsq_fast.models.zoo import load_model

    weights = os.path.join(ROOT, "..", "shared", "data", "weights", f"cifar10_{name}.pt")
    torch.manual_seed(0)
    return load_model(name, weights if os.path.exists(weights) else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(cfg["threads"])
    from zsq_fast import distributed as zd
    from zsq_fast.generate import generate

    device = torch.device(cfg["device"])
    if world > 1:
        zd.init_from_env(device, timeout_s=300)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    comm = {"s": 0.0, "calls": 0, "bytes": 0}
    timed = zd._collective

    def collective(what, fn, *args, **kwargs):  # every collective of zsq_fast.distributed passes here
        t0 = time.perf_counter()
        if args and isinstance(args[0], torch.Tensor):
            comm["bytes"] += args[0].numel() * args[0].element_size()
        try:
            return timed(what, fn, *args, **kwargs)
        finally:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
                torch.cuda.synchronize()
            comm["s"] += time.perf_counter() - t0
            comm["calls"] += 1

    src = _model(cfg["model"])
    method, kw = METHODS[cfg["method"]]
    kwargs = dict(iterations=cfg["iterations"], chunk_size=cfg["chunk"], mean=src.mean, std=src.std,
                  device=device, seed=0, **kw)
    # warm-up: one step (allocations, oneDNN/cuDNN plans), not timed
    generate(src.model.to(device), cfg["n"], method, src.input_size, **dict(kwargs, iterations=1))
    marks = []  # the collectives' totals after each step (progress runs after a step's last one)
    zd._collective = collective
    _, rec = generate(src.model, cfg["n"], method, src.input_size,
                      progress=lambda step, total, losses: marks.append(dict(comm)), **kwargs)
    zd._collective = timed
    between = len(marks) - 1  # steps 2..n: no setup or final whole-set pass inside
    latency = 0.0
    if world > 1:  # the bare cost of one step's statistics all-reduce, without waiting for a slower rank
        t = torch.zeros(max(1, int(comm["bytes"] / max(1, comm["calls"]) / 8)), dtype=torch.float64, device=device)
        times = []
        for _ in range(21):
            zd.barrier()
            t0 = time.perf_counter()
            zd.all_reduce_sum_(t)
            if t.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        latency = sorted(times)[len(times) // 2]
    torch.save({"latency_s": latency, "steps_s": rec.timings["steps_s"], "comm_s": (marks[-1]["s"] - marks[0]["s"]) / between,
                "calls": (marks[-1]["calls"] - marks[0]["calls"]) / between,
                "bytes": (marks[-1]["bytes"] - marks[0]["bytes"]) / between, "final_bn": rec.final_bn_loss,
                "steps": rec.steps_done}, os.path.join(out_dir, f"r{rank}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


def measure(cfg: dict, world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, cfg, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"world {world}: a rank failed ({[p.exitcode for p in procs]})")
        ranks = [torch.load(os.path.join(out, f"r{r}.pt")) for r in range(world)]
    steps = ranks[0]["steps"]
    step_s = max(r["steps_s"] for r in ranks) / steps
    return {"world": world, "step_s": step_s, "throughput": cfg["n"] / step_s,
            "comm_ms": 1e3 * ranks[0]["comm_s"], "comm_calls": ranks[0]["calls"],
            "comm_bytes": ranks[0]["bytes"], "final_bn": ranks[0]["final_bn"], "latency_ms": 1e3 * ranks[0]["latency_s"]}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--iterations", type=int, default=5, help="timed steps (at least 2)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--methods", default="dgh-exact,dgh-stale,bns")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out")
    a = p.parse_args(argv)
    worlds = [int(w) for w in a.worlds.split(",")]
    if a.device == "cuda":
        worlds = [w for w in worlds if w <= torch.cuda.device_count()]
    lines = [f"model {a.model}, N = {a.n}, chunk {a.chunk}, {a.iterations} timed steps after 1 warm-up step, "
             f"device {a.device}" + (f", {a.threads} thread(s) per rank" if a.device == "cpu" else "") +
             f", backend {'nccl' if a.device == 'cuda' else 'gloo'}", "",
             "| method | ranks | s / step | image-it / s | speed-up | collectives ms / step (calls, bytes) | "
             "one all-reduce alone, ms | final L_BN |", "|---|---|---|---|---|---|---|---|"]
    for name in a.methods.split(","):
        cfg = dict(model=a.model, n=a.n, iterations=a.iterations, chunk=a.chunk, threads=a.threads,
                   device=a.device, method=name)
        base = None
        for w in worlds:
            r = measure(cfg, w)
            base = base or r["throughput"]
            lines.append(f"| {name} | {w} | {r['step_s']:.3f} | {r['throughput']:.0f} | "
                         f"{r['throughput'] / base:.2f} | {r['comm_ms']:.2f} ({r['comm_calls']:.0f}, {r['comm_bytes']:.0f}) | "
                         f"{r['latency_ms']:.3f} | {r['final_bn']:.4f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
