"""Atomic checkpoints of a generation run: write a temp file, then os.replace it.

A checkpoint holds everything the next step depends on (images, moments, step, lr schedule,
RNG states, caches), so a run killed after a checkpoint and resumed equals the uninterrupted run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import FileFormatError, InvalidArgumentError
from ..fileio import load_torch_file, write_atomic


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp), "checkpoint")


_KEYS = ("settings", "step", "x", "exp_avg", "exp_avg_sq", "plateau", "generator", "history", "initial_bn_loss",
         "stale_cache")


def load_checkpoint(path: str | os.PathLike, settings: dict, n_images: int | None = None) -> dict | None:
    """The saved state, or None when there is none; a checkpoint of other settings is an error.
    n_images: the images the file holds (a rank's shard), default the settings' n_images."""
    path = Path(path)
    if not path.exists():
        return None
    what = "zsq_fast generation checkpoint"
    state = load_torch_file(path, what)
    try:
        missing = [k for k in _KEYS if k not in state]
        saved = json.loads(state["settings"]) if not missing else None
    except (TypeError, ValueError):
        missing = ["settings"]
    if missing or not isinstance(saved, dict):
        raise FileFormatError(f"{str(path)!r} is not a {what} (missing or unreadable: "
                              f"{', '.join(missing) or 'settings'}); remove it or use another checkpoint path")
    current = json.loads(json.dumps(settings))
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        raise InvalidArgumentError(f"checkpoint {path} was written with other settings ({', '.join(diff)}); "
                                   "remove it or use another checkpoint path")
    shape = (current["n_images"] if n_images is None else n_images, 3, current["image_size"][0] + current["margin"],
             current["image_size"][1] + current["margin"])
    for k in ("x", "exp_avg", "exp_avg_sq"):
        t = state[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
            raise FileFormatError(f"checkpoint {str(path)!r} is corrupted: {k!r} is not a finite {shape} tensor")
    return state
