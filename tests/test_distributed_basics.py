"""zsq_fast.distributed: sharding arithmetic, the single-process identity, and a real 2-rank gloo group."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zsq_fast import distributed as zd


@pytest.mark.parametrize("n,world", [(0, 2), (1, 3), (10, 3), (1000, 8), (7, 7)])
def test_shards_cover_every_item_once(n, world):
    shards = [zd.shard(n, r, world) for r in range(world)]
    assert [i for s in shards for i in range(s.start, s.stop)] == list(range(n))
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_is_the_identity():
    assert not zd.active() and zd.rank() == 0 and zd.world_size() == 1 and zd.is_main()
    t = torch.tensor([1.0, 2.0])
    assert zd.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert zd.broadcast_object({"a": 1}) == {"a": 1}
    assert zd.all_gather_object(3) == [3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert zd.init_from_env("cpu", timeout_s=60)
    try:
        t = torch.tensor([float(rank + 1)], dtype=torch.float64)
        zd.all_reduce_sum_(t)
        m = torch.tensor([float(rank)])
        zd.all_reduce_max_(m)
        obj = zd.broadcast_object({"from": zd.rank()})
        gathered = zd.all_gather_object(f"r{zd.rank()}")
        out.put((rank, zd.world_size(), float(t), float(m), obj["from"], gathered))
        zd.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reduce_and_broadcast():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = sorted(out.get(timeout=5) for _ in range(2))
    assert got == [(0, 2, 3.0, 1.0, 0, ["r0", "r1"]), (1, 2, 3.0, 1.0, 0, ["r0", "r1"])]
