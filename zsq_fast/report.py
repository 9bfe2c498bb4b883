"""Run settings (device, seed, precision) and the JSON report every command writes beside its outputs.

A report holds the settings, wall time per phase, peak memory (CUDA allocator peak and process RSS),
losses and accuracies, so a result can be traced to exactly what produced it.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError
from .fileio import write_atomic

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; a named CUDA device must exist."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {name} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"unsupported device {name!r} (use cpu, cuda, cuda:N or auto)")
    return dev


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for forward passes: autocast to bf16/fp16 (CPU autocast supports both); fp32 = off."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory(device: torch.device) -> dict:
    """CUDA allocator peak (when on CUDA) and the process' peak resident set size, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 1024 if sys.platform != "darwin" else rss / 2**20  # Linux reports KiB, macOS bytes
    out = {"process_peak_rss_mib": round(rss_mib, 1)}
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (torch.device, torch.dtype, os.PathLike)):
        return str(v)
    if isinstance(v, float) and v != v:
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if hasattr(v, "to_dict"):
        return jsonable(v.to_dict())
    return repr(v)


@dataclass
class RunReport:
    command: str
    settings: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[phase] = round(self.timings_s.get(phase, 0.0) + time.perf_counter() - t0, 4)

    def to_dict(self, device: torch.device | None = None) -> dict:
        return jsonable({
            "command": self.command,
            "zsq_fast_version": _version(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_time_s": round(time.time() - self.started, 3),
            "settings": self.settings,
            "timings_s": self.timings_s,
            "peak_memory": peak_memory(device or torch.device("cpu")),
            "losses": self.losses,
            "metrics": self.metrics,
            **self.extra,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(),
                            "cuda_device": torch.cuda.get_device_name() if device is not None
                            and device.type == "cuda" else None,
                            "ops_backend": _ops_backend()},
        })

    def write(self, path: str, device: torch.device | None = None) -> str:
        text = json.dumps(self.to_dict(device), indent=2) + "\n"  # serialized first: no half-written report
        write_atomic(path, lambda tmp: tmp.write_text(text), "report")
        return path


def report_path_for(output: str, suffix: str = "report") -> str:
    """Beside an output: out/images.pt -> out/images.report.json; out/pngs/ -> out/pngs.report.json."""
    out = os.path.normpath(output)
    stem = os.path.splitext(out)[0] if not os.path.isdir(out) else out
    return f"{stem}.{suffix}.json"


def _version() -> str:
    from . import __version__

    return __version__


def _ops_backend():
    try:
        from . import ops

        return jsonable(ops.backend())
    except Exception as e:  # a report must never fail on a diagnostics field
        return f"unavailable ({type(e).__name__})"


class LossLog:
    """Collects a progress callback's losses at most `max_points` times per run (keeps reports small)."""

    def __init__(self, total: int | None = None, max_points: int = 50):
        self.every = max(1, (total or max_points) // max_points)
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {}

    def add(self, step: int, losses: dict | float | None, total: int | None = None, force: bool = False) -> None:
        if losses is None:
            return
        last = total is not None and step + 1 >= total
        if not (force or last or step % self.every == 0):
            return
        if not isinstance(losses, dict):
            losses = {"loss": losses}
        numbers = {str(k): round(float(v), 6) for k, v in losses.items() if _is_number(v)}
        if not numbers:
            return
        self.steps.append(int(step))
        for k, v in numbers.items():  # a key missing at some steps gets None there, lists stay aligned
            self.values.setdefault(k, [None] * (len(self.steps) - 1)).append(v)
        for k, vals in self.values.items():
            if len(vals) < len(self.steps):
                vals.append(None)

    def to_dict(self) -> dict:
        return {"steps": self.steps, **self.values}


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
