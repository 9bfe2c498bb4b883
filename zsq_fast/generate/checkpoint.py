"""Atomic checkpoints of a generation run: write a temp file, then os.replace it.

A checkpoint holds everything the next step depends on (images, moments, step, lr schedule,
RNG states, caches), so a run killed after a checkpoint and resumed equals the uninterrupted run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, settings: dict) -> dict | None:
    """The saved state, or None when there is none; a checkpoint of other settings is an error."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state["settings"])
    current = json.loads(json.dumps(settings))
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        raise ValueError(f"checkpoint {path} was written with other settings ({', '.join(diff)}); "
                         "remove it or use another checkpoint path")
    return state
