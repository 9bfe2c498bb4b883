"""Inputs and targets of one reconstruction unit, fetched per batch.

For a unit U the loop needs, for a batch of calibration images:
  x_q   U's input in the quantized model (the already-quantized prefix),
  x_fp  U's input in the float model (for QDrop's input mixing),
  y_fp  U's output in the float model (the reconstruction target; for a layer with a fused activation, the
        activation's output: fp_out).
x_q is fetched with the `unrounded` site quantizers off: the sites U learns on its input (brecq.input_sites).
cache="host"      computed once for all images, kept in host memory (pinned when the device is a GPU),
                  copied to the device per batch: device memory depends on the batch size only.
cache="device"    computed once, kept on the device (fastest; needs room for the whole set).
cache="recompute" nothing kept: each batch re-runs both models' prefixes up to U (slowest, least memory).
cache="disk"      computed once, kept in unlinked memory-mapped files in ZSQ_FAST_CACHE_DIR (default: the
                  system temp folder; point it at a disk when that is tmpfs): host-cache speed while the
                  page cache holds it, and sets larger than memory still work; nothing is left behind.
The calibration images themselves stay where the caller put them (host, a file, a Dataset: a CalibData)
and move per batch. quantize() picks "recompute" for a lazy source (a Dataset, a memory-mapped set), whose
point is not to hold the set in memory: a host cache of unit inputs/targets would be larger than the
images. Under a process group each rank's UnitData covers its own shard (local indices).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import weakref

import torch
from torch import nn

from ..errors import InvalidArgumentError, UnsupportedModelError
from .calib_data import CalibData

MODES = ("host", "device", "recompute", "disk")


_KWARGS_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()  # unit -> kwargs


class _Stop(Exception):
    """Raised by a hook once the unit's tensors are captured: the rest of the forward is skipped."""


@torch.no_grad()
def capture(model: nn.Module, unit: nn.Module, images: torch.Tensor, want_output: bool,
            out_module: nn.Module | None = None):
    """(input, output or None) of `unit` when `model` runs on `images`; out_module: take the output of that
    module instead (the activation fused into a layer: the pair is one unit)."""
    got: dict[str, torch.Tensor] = {}

    def pre(mod, args, kwargs):
        if got.get("checking"):
            return
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or any(
                isinstance(v, (torch.Tensor, list, tuple, dict)) for v in kwargs.values()):
            raise UnsupportedModelError("unit must be called with exactly one tensor argument")
        got["x"] = args[0].detach().clone()  # clone: a later in-place op must not change what we keep
        got["kwargs"] = kwargs
        if not want_output:
            raise _Stop

    def post(mod, args, out):
        if got.get("checking"):
            return
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError("unit must return one tensor")
        key = tuple(sorted(got["kwargs"].items()))
        if key and (out_module is None or out_module is unit) and key not in _KWARGS_CHECKED.get(unit, ()):
            # reconstruction calls the unit with its input alone: constant keyword arguments must not matter
            # (checked on the first batch captured with them, not again on every batch)
            got["checking"] = True
            alone = unit(got["x"])
            got["checking"] = False
            if not torch.equal(alone, out):
                raise UnsupportedModelError("unit's keyword arguments change its output")
            _KWARGS_CHECKED.setdefault(unit, set()).add(key)
        got["y"] = out.detach().clone()
        raise _Stop

    handles = [unit.register_forward_pre_hook(pre, with_kwargs=True)]
    if want_output:
        handles.append((out_module or unit).register_forward_hook(post))
    try:
        model(images)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "x" not in got:
        raise RuntimeError("the unit did not run during the forward pass")
    return got["x"], got.get("y")


@contextlib.contextmanager
def quantizers_off(quantizers):
    """The quantizers pass their input through (enabled = False) inside the block, as they were after it."""
    was = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, on in zip(quantizers, was):
            q.enabled = on


def disk_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor backed by a file in ZSQ_FAST_CACHE_DIR that is unlinked at once: the mapping
    keeps it alive and the space is returned when the tensor goes (even if the process is killed)."""
    folder = os.environ.get("ZSQ_FAST_CACHE_DIR") or tempfile.gettempdir()
    numel = math.prod(shape)
    need = numel * dtype.itemsize
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InvalidArgumentError(f'cache="disk": a unit\'s inputs/targets need {need / 2**30:.2f} GiB in {folder}, '
                                   f"which has {free / 2**30:.2f} GiB free; set ZSQ_FAST_CACHE_DIR to a larger disk "
                                   'or use cache="recompute"')
    fd, path = tempfile.mkstemp(prefix="zsq_fast_unit_", suffix=".cache", dir=folder)
    os.close(fd)
    try:
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.unlink(path)
    return t.view(shape)


class UnitData:
    """Batches (x_q, x_fp, y_fp) of one unit; see the module docstring for the three modes."""

    def __init__(self, qmodel: nn.Module, q_unit: nn.Module, fpmodel: nn.Module, fp_unit: nn.Module,
                 images: CalibData, *, batch_size: int, device: torch.device, mode: str = "host",
                 need_fp_input: bool = False, fp_out: nn.Module | None = None, unrounded=()):
        if mode not in MODES:
            raise InvalidArgumentError(f"cache must be one of {MODES}, got {mode!r}")
        self.qmodel, self.q_unit, self.fpmodel, self.fp_unit = qmodel, q_unit, fpmodel, fp_unit
        self.images, self.device, self.mode, self.need_fp_input = images, device, mode, need_fp_input
        self.fp_out, self.unrounded = fp_out, list(unrounded)
        self.n = images.n
        self.store: dict[str, torch.Tensor] = {}
        if mode != "recompute":
            self._fill(batch_size)
        else:  # one image through both prefixes: a unit that cannot be captured fails here, as with a cache
            self._compute(images.rows(0, 1))

    def _compute(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        imgs = imgs.to(self.device, non_blocking=True)
        with quantizers_off(self.unrounded):
            x_q, _ = capture(self.qmodel, self.q_unit, imgs, want_output=False)
        x_fp, y_fp = capture(self.fpmodel, self.fp_unit, imgs, want_output=True, out_module=self.fp_out)
        out = {"x_q": x_q, "y_fp": y_fp}
        if self.need_fp_input:
            out["x_fp"] = x_fp
        return out

    def _fill(self, batch_size: int) -> None:
        pin = self.mode == "host" and self.device.type == "cuda"
        where = self.device if self.mode == "device" else torch.device("cpu")
        for i in range(0, self.n, batch_size):
            part = self._compute(self.images.rows(i, i + batch_size))
            for k, t in part.items():
                if k not in self.store:
                    shape = (self.n, *t.shape[1:])
                    if self.mode == "disk":
                        self.store[k] = disk_buffer(shape, t.dtype)
                    else:
                        buf = torch.empty(shape, dtype=t.dtype, device=where)
                        self.store[k] = buf.pin_memory() if pin else buf
                self.store[k][i:i + t.shape[0]].copy_(t)

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of samples `idx` (a CPU LongTensor) on the device."""
        if self.mode == "recompute":
            return self._compute(self.images.take(idx))
        cuda = self.device.type == "cuda"
        if self.mode == "device":  # a pageable index copied to a GPU would wait for the copy: every iteration
            idx = idx.pin_memory().to(self.device, non_blocking=True) if cuda else idx.to(self.device)
            return {k: t[idx] for k, t in self.store.items()}
        out = {}
        for k, t in self.store.items():
            if t.is_pinned() or cuda:  # gather into pinned memory so the copy is asynchronous (a pageable copy,
                # e.g. from the disk cache, waits for it; the caching host allocator keeps the buffer alive until
                # the copy is done)
                buf = torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                torch.index_select(t, 0, idx, out=buf)
                out[k] = buf.to(self.device, non_blocking=True)
            else:
                out[k] = t[idx].to(self.device)
        return out
