"""The files of a generation run split over the ranks of a process group.

A sharded folder holds rank 0's manifest.json and one entry per rank:

    manifest.json   {"format", "kind", "world_size", "n_images", "shards": [{"rank", "start", "stop", "path"}]}
    rank-00000...   rank r's part: images [start, stop) of the whole set

The same layout serves a run's checkpoint (`checkpoint=FOLDER` under several ranks: each rank's
checkpoint file rank-RRRRR.pt, or its run folder rank-RRRRR/ for store="disk") and the CLI's
output (rank-RRRRR.pt image files or PNG folders). load_images(folder) reads the shards as one set in
global order.

Checkpoint files are kept in two generations (rank-RRRRR.pt and rank-RRRRR.prev.pt): the older one
is deleted only after every rank has written the newer one (a barrier), so whatever moment a rank
dies at, every rank holds the newest step they all reached, and a rerun resumes from it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import distributed as zd
from ..errors import FileFormatError, InvalidArgumentError, ZsqFastError
from ..fileio import write_atomic
from . import run_folder
from .checkpoint import load_checkpoint, save_checkpoint
from .shards import Shard

MANIFEST = "manifest.json"
FORMAT = 1


def rank_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def is_sharded(folder) -> bool:
    return Path(folder).is_dir() and (Path(folder) / MANIFEST).is_file()


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
        if m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
            raise ValueError("unknown layout")
        rows = sorted(m["shards"], key=lambda r: r["start"])
        if [r["rank"] for r in sorted(rows, key=lambda r: r["rank"])] != list(range(int(m["world_size"]))) or \
                rows[0]["start"] != 0 or rows[-1]["stop"] != m["n_images"] or \
                any(a["stop"] != b["start"] for a, b in zip(rows, rows[1:])):
            raise ValueError("the shards do not cover the set once")
        return m
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise FileFormatError(f"{path} is not a zsq_fast shard manifest ({exc})") from None


def write_manifest(folder, shard: Shard, suffix: str, kind: str) -> None:
    """Rank 0 writes the manifest of every rank's shard (a collective: every rank calls it with the
    suffix of its own entry: "" for a run folder, ".pt" for a file)."""
    notes = zd.all_gather_object({**shard.note(), "path": rank_name(shard.rank) + suffix}, "the shard manifest")
    if not zd.is_main():
        return
    rows = [{k: n[k] for k in ("rank", "start", "stop", "path")} for n in notes]  # store="auto": each rank's own
    text = json.dumps({"format": FORMAT, "kind": kind, "world_size": shard.world, "n_images": shard.n_total,
                       "shards": rows}, indent=1)
    write_atomic(Path(folder) / MANIFEST, lambda tmp: tmp.write_text(text), "shard manifest")


def _agree(problem: str | None) -> None:
    """Raise on every rank the first problem any rank found (one line naming the rank)."""
    problems = [p for p in zd.all_gather_object(problem, "the run-folder check") if p]
    if problems:
        raise InvalidArgumentError(problems[0])


def agreed(fn, what: str):
    """fn() on every rank; when it fails on some rank (bad input: a ZsqFastError), every rank raises,
    instead of the others waiting in their next collective until the timeout. The failing rank raises
    its own error, the others one line naming it."""
    try:
        result, problem = fn(), None
    except ZsqFastError as exc:
        result, problem = exc, f"rank {zd.rank()}: {exc}"
    problems = [(r, p) for r, p in enumerate(zd.all_gather_object(problem, what)) if p]
    if isinstance(result, ZsqFastError):
        raise result
    if problems:
        raise InvalidArgumentError(f"{what} failed on {problems[0][1]}")
    return result


def prepare_checkpoint(folder, shard: Shard, disk: bool) -> Path:
    """This rank's checkpoint path inside the sharded checkpoint folder; checks an existing manifest
    against this run (world size, N and shards) and writes a new one (rank 0)."""
    folder = Path(folder)
    problem = None
    if folder.exists() and not folder.is_dir():
        problem = f"checkpoint {folder} is a file; a run on {shard.world} ranks keeps its checkpoint in a folder"
    elif is_sharded(folder):
        try:
            m = read_manifest(folder)
            if (m["world_size"], m["n_images"]) != (shard.world, shard.n_total):
                problem = (f"checkpoint folder {folder} belongs to a run of n_images={m['n_images']} on "
                           f"{m['world_size']} ranks, this run has n_images={shard.n_total} on {shard.world} ranks; "
                           "rerun with the same number of ranks or use another folder")
            else:
                row = next(r for r in m["shards"] if r["rank"] == shard.rank)
                if (row["start"], row["stop"]) != (shard.start, shard.stop):
                    problem = (f"checkpoint folder {folder}: rank {shard.rank} held images [{row['start']}, "
                               f"{row['stop']}), now [{shard.start}, {shard.stop}) (another chunk_size?)")
        except FileFormatError as exc:
            problem = str(exc)
    _agree(problem)
    if zd.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    zd.barrier("the checkpoint folder")
    folder.mkdir(parents=True, exist_ok=True)  # ranks on other machines: their own copy of the folder
    write_manifest(folder, shard, "" if disk else ".pt", "generation checkpoint")
    return folder / (rank_name(shard.rank) + ("" if disk else ".pt"))


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_rank_checkpoint(path: Path, state: dict) -> None:
    """Write this rank's checkpoint; the previous one goes once every rank has its new one."""
    prev = _previous(path)
    if path.exists():
        os.replace(path, prev)
    save_checkpoint(path, state)
    zd.barrier(f"the checkpoint of step {state['step']}")
    prev.unlink(missing_ok=True)


def load_rank_checkpoint(path: Path, compared: dict, n_images: int) -> dict | None:
    """The newest saved state every rank holds (None: a fresh start everywhere); n_images: this rank's."""
    saved = agreed(lambda: [s for s in (load_checkpoint(path, compared, n_images),
                                        load_checkpoint(_previous(path), compared, n_images)) if s],
                   "reading the checkpoints")
    steps = zd.all_gather_object(sorted(int(s["step"]) for s in saved), "the checkpoint steps")
    common = set(steps[0]).intersection(*steps[1:])
    if not common:
        if not any(steps):
            return None
        raise InvalidArgumentError(f"checkpoint folder {path.parent}: the ranks hold no common step (steps per "
                                   f"rank: {steps}); remove the folder to start over")
    step = max(common)
    return next(s for s in saved if int(s["step"]) == step)


def agree_on_step(store, saved: dict | None) -> dict | None:
    """Every rank's run folder (store="disk") resumes from the same step: a rank one step ahead of the
    others (it committed a step whose collectives had ended when a peer died) steps back to theirs, its
    previous images being still in the other buffer. Returns this rank's state to resume from."""
    steps = zd.all_gather_object(store.step, "the run-folder steps")
    target = min(steps)
    if max(steps) - target > 1:
        raise InvalidArgumentError(f"checkpoint folder {store.folder.parent}: the ranks' run folders stopped at "
                                   f"steps {', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))}, more than one "
                                   "apart; they cannot resume together: remove the folder to start over")
    ahead = store.step > target
    return agreed(lambda: run_folder.step_back(store) if ahead else saved,
                  f"stepping the run folders back to step {target}")


def save_shard(images: torch.Tensor, folder, shard: Shard, save, suffix: str) -> Path:
    """Rank r's images into folder/rank-RRRRR{suffix} with save(images, path); rank 0 writes the manifest."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"output {folder} is a file; a run on {shard.world} ranks writes a folder of shards")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (rank_name(shard.rank) + suffix)
    save(images, path)
    write_manifest(folder, shard, suffix, "images")
    return path


def load_shards(folder, load, count) -> tuple[list[dict], list]:
    """(manifest rows, load(path) of each shard) in global order, each shard's size checked against the
    manifest; count(part) gives the number of images of a loaded part."""
    folder = Path(folder)
    rows = sorted(read_manifest(folder)["shards"], key=lambda r: r["start"])
    parts = [load(folder / row["path"]) for row in rows]
    for row, part in zip(rows, parts):
        if count(part) != row["stop"] - row["start"]:
            raise FileFormatError(f"{folder / row['path']} holds {count(part)} images, the manifest says "
                                  f"{row['stop'] - row['start']}")
    return rows, parts


def load_sharded(folder, load) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) of every shard in global order; load(path) -> (images, labels)."""
    _, parts = load_shards(folder, load, lambda part: part[0].shape[0])
    labels = [y for _, y in parts]
    return (torch.cat([x for x, _ in parts]),
            torch.cat(labels) if all(y is not None for y in labels) else None)
