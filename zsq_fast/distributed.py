"""The process group as zsq_fast sees it: who am I, how many are we, and the few collectives the
generators and the quantizer use. Without an initialised group (a plain `python` run) every call is
the single-process identity, so algorithm code calls these unconditionally.

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; `init_from_env` turns that into a process group
(NCCL on CUDA, gloo on CPU) with a timeout, so a dead rank ends the others with an error, not a hang.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import ZsqFastError

DEFAULT_TIMEOUT_S = 600.0


class DistributedError(ZsqFastError, RuntimeError):
    """A collective failed or timed out: another rank died or stopped answering."""


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 writes the files every rank agrees on (manifest, quantized model, report)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device | str | None = None, timeout_s: float | None = None) -> bool:
    """Initialise the default group from torchrun's environment when it asks for more than one rank
    and none exists yet. Returns True if this call created the group. ZSQ_FAST_DIST_TIMEOUT (seconds)
    overrides the collective timeout."""
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    timeout_s = float(os.environ.get("ZSQ_FAST_DIST_TIMEOUT", timeout_s or DEFAULT_TIMEOUT_S))
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shard(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of n items: sizes differ by at most one, lower ranks take the extra."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (1 if rank_ < extra else 0))


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as e:  # gloo/NCCL raise these on a peer's death or timeout
        raise DistributedError(f"{what} failed on rank {rank()} of {world_size()}: another rank died or stopped "
                               f"answering ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def all_reduce_sum_(t: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    """Sum t over the ranks, in place; identity in a single process."""
    if active():
        _collective(what, dist.all_reduce, t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: torch.Tensor, what: str = "all-reduce") -> torch.Tensor:
    if active():
        _collective(what, dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0, what: str = "broadcast"):
    """rank src's picklable obj on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    _collective(what, dist.broadcast_object_list, box, src=src)
    return box[0]


def barrier(what: str = "barrier") -> None:
    if active():
        _collective(what, dist.barrier)


def all_gather_cat(t: torch.Tensor, what: str = "all-gather") -> torch.Tensor:
    """Every rank's t (any length along dim 0, same trailing shape) concatenated in rank order, on every
    rank; t itself in a single process."""
    if not active():
        return t
    sizes = torch.zeros(world_size(), dtype=torch.int64, device=t.device)
    sizes[rank()] = t.shape[0]
    all_reduce_sum_(sizes, what + " (sizes)")
    longest = int(sizes.max())
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    _collective(what, dist.all_gather, parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])


def broadcast_(t: torch.Tensor, src: int = 0, what: str = "broadcast") -> torch.Tensor:
    """rank src's values of t written into t on every rank (in place); identity in a single process."""
    if active():
        _collective(what, dist.broadcast, t, src=src)
    return t


def collective_device() -> torch.device:
    """Where a tensor must live to take part in a collective: this rank's GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj, what: str = "all-gather") -> list:
    """Every rank's picklable obj, in rank order, on every rank; [obj] in a single process."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _collective(what, dist.all_gather_object, out, obj)
    return out


class Heartbeat:
    """Names the rank that stopped. Each rank records in the group's key-value store (the rendezvous') the
    step it began; after a failed collective the ranks whose record is behind are the ones that died or
    stalled (gloo and NCCL only report that *a* peer is gone). Every rank creates its Heartbeats in the same
    order, so the keys of one loop match across ranks and an earlier loop's records do not count."""
    _made: dict[str, int] = {}

    def __init__(self, name: str):
        Heartbeat._made[name] = Heartbeat._made.get(name, 0) + 1
        self.prefix = f"zsq_fast/{name}/{Heartbeat._made[name]}/"

    @staticmethod
    def _store():
        if not active():
            return None
        try:
            import torch.distributed.distributed_c10d as c10d

            return c10d._get_default_store()
        except Exception:  # noqa: BLE001 - naming a dead rank is a courtesy; the collective's error still stands
            return None

    def beat(self, step: int) -> None:
        """This rank began `step` (one small write to the store)."""
        store = self._store()
        if store is not None:
            try:
                store.set(f"{self.prefix}{rank()}", str(step))
            except Exception:  # noqa: BLE001 - the store's host may be the rank that died
                pass

    def who_stopped(self, step: int) -> str:
        """Which ranks did not begin `step`, by their records (for the error message of a failed step)."""
        store = self._store()
        if store is None:
            return "another rank stopped answering"
        behind = []
        try:
            for r in range(world_size()):
                key = f"{self.prefix}{r}"
                last = int(store.get(key)) if store.check([key]) else 0
                if last < step:
                    behind.append(f"rank {r} (last began step {last})")
        except Exception:  # noqa: BLE001
            return "another rank stopped answering (the group's store is unreachable too)"
        if not behind:
            return "a rank died or stopped answering during this step"
        return f"{', '.join(behind)} died or stopped answering"

    def failed(self, where: str, step: int, error: DistributedError) -> DistributedError:
        """error, prefixed with where/step and the ranks that stopped."""
        return DistributedError(f"{where} {step}: {self.who_stopped(step)}; {error}")


__all__ = ["DistributedError", "active", "rank", "world_size", "is_main", "launched_by_torchrun",
           "init_from_env", "shard", "all_reduce_sum_", "all_reduce_max_", "broadcast_object", "barrier",
           "all_gather_cat", "broadcast_", "collective_device", "all_gather_object", "Heartbeat"]
