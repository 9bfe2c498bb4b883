"""store="disk": a run folder holding the canvases and both RAdam moments as raw float32 files, read
and written chunk by chunk (pread/pwrite: process memory stays at a chunk, the OS page cache does
the rest), and the small run state beside them. The folder is the checkpoint:

    run.json      the run configuration and the image shape, written once when the folder is made
    x.f32, exp_avg.f32, exp_avg_sq.f32   (N, C, Hc, Wc) float32, C order
    state.pt      step, lr schedule, RNG state, stale cache, loss history; replaced atomically per step
    step.lock     the step being written; removed once state.pt holds it
    undo.log      during a step: the previous contents of every chunk the step has overwritten
    images.f32    the output images (N, C, H, W) float32, written at the end

Images are updated in place. Before a chunk is overwritten, its old images and moments are appended
to undo.log (entry first, data after, in that order through the page cache), so a process killed at
any point inside step k (kill -9 included) leaves step.lock = k, state.pt of step k - 1 and a log that
restores every touched chunk: opening the folder rolls the step back and the run resumes as if it had
stopped after step k - 1, giving the uninterrupted run's images. The log costs one extra write of
each chunk per step (through the page cache; it is deleted at the step's end).

A process kill loses nothing the page cache holds; a power loss or reboot does. The data files are
fsynced every `checkpoint_every` steps (and at the last), not every step (on this project's 2-core VM
an fsync per step doubled the cost of a step at N = 10^4). state.pt records the machine's boot id and
the last synced step, so a folder whose machine restarted after unsynced steps is refused with one
line instead of resuming from images that may be partly lost.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgumentError

FORMAT = 1
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
ARRAYS = ("x", "exp_avg", "exp_avg_sq")
_OURS = {"run.json", "state.pt", "state.pt.tmp", "run.json.tmp", "step.lock", "step.lock.tmp", "undo.log",
         "images.f32", "images.f32.tmp", *(f"{a}.f32" for a in ARRAYS)}
_ENTRY = np.dtype([("start", "<i8"), ("stop", "<i8")])  # an undo entry's header; x, m, v follow


class RunFolderError(InvalidArgumentError):
    """A run folder that cannot be used; the message is one line naming the folder (generate's
    `checkpoint`) and the problem."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"checkpoint folder {path.parent}: cannot write {path.name} ({exc.strerror or exc}); "
                             "is the disk full or the folder read-only?") from None


class DiskStore:
    """The ImageStore interface (n, chunks, load, put, flush) over the three files of a run folder."""

    def __init__(self, folder: Path, shape: tuple[int, ...]):
        self.folder, self.shape = folder, tuple(shape)
        self.image_numel = math.prod(shape[1:])
        self._fds = {a: os.open(folder / f"{a}.f32", os.O_RDWR) for a in ARRAYS}
        self._undo = None  # the open undo log while a step runs
        self.synced_step = 0  # the last step whose images were fsynced

    @property
    def n(self) -> int:
        return self.shape[0]

    def chunks(self, chunk_size: int) -> list[slice]:
        return [slice(i, min(i + chunk_size, self.n)) for i in range(0, self.n, chunk_size)]

    def _read(self, name: str, sl: slice) -> torch.Tensor:
        start, stop, _ = sl.indices(self.n)
        out = np.empty((stop - start, *self.shape[1:]), dtype=np.float32)
        buf, offset, done = memoryview(out).cast("B"), start * self.image_numel * 4, 0
        while done < len(buf):  # one read call moves at most ~2 GiB
            got = os.preadv(self._fds[name], [buf[done:]], offset + done)
            if got == 0:
                raise RunFolderError(f"checkpoint folder {self.folder}: {name}.f32 is shorter than its {self.n} images "
                                     "(truncated?); remove the folder to start over")
            done += got
        return torch.from_numpy(out)

    def _write(self, name: str, sl: slice, t: torch.Tensor) -> None:
        start, stop, _ = sl.indices(self.n)
        data = t.detach().to("cpu", torch.float32).contiguous().numpy()
        if data.shape[0] != stop - start:
            raise ValueError(f"{name}: {data.shape[0]} images for a slice of {stop - start}")
        buf, offset, done = memoryview(data).cast("B"), start * self.image_numel * 4, 0
        try:
            while done < len(buf):
                done += os.pwrite(self._fds[name], buf[done:], offset + done)
        except OSError as exc:
            raise RunFolderError(f"checkpoint folder {self.folder}: cannot write {name}.f32 ({exc.strerror})") from None

    def load(self, sl: slice, device, moments: bool = False):
        """The chunk's images (and moments) on the compute device, as copies."""
        if not moments:
            return self._read("x", sl).to(device)
        return tuple(self._read(a, sl).to(device) for a in ARRAYS)

    def put(self, sl: slice, x, exp_avg=None, exp_avg_sq=None) -> None:
        if self._undo is not None:
            self._log_old(sl)
        self._write("x", sl, x)
        if exp_avg is not None:
            self._write("exp_avg", sl, exp_avg)
            self._write("exp_avg_sq", sl, exp_avg_sq)

    def _log_old(self, sl: slice) -> None:
        start, stop, _ = sl.indices(self.n)
        head = np.array([(start, stop)], dtype=_ENTRY).tobytes()
        try:
            self._undo.write(head + b"".join(memoryview(self._read(a, sl).numpy()).cast("B") for a in ARRAYS))
            self._undo.flush()  # in the page cache before the data write below: a kill cannot reorder them
        except OSError as exc:
            raise RunFolderError(f"checkpoint folder {self.folder}: cannot write undo.log ({exc.strerror})") from None

    def begin_step(self) -> None:
        self._undo = open(self.folder / "undo.log", "wb")

    def end_step(self) -> None:
        if self._undo is not None:
            self._undo.close()
            self._undo = None
        (self.folder / "undo.log").unlink(missing_ok=True)

    def roll_back(self) -> bool:
        """Restore the chunks of an interrupted step from undo.log (newest first); False when the log is
        missing or unreadable."""
        path = self.folder / "undo.log"
        if not path.exists():
            return False
        raw = path.read_bytes()
        entries, pos = [], 0
        while len(raw) - pos >= _ENTRY.itemsize:  # a shorter rest is a torn header
            start, stop = np.frombuffer(raw, _ENTRY, 1, pos)[0].tolist()
            if not 0 <= start < stop <= self.n:
                return False  # not an entry this code wrote
            size, body = (stop - start) * self.image_numel * 4, pos + _ENTRY.itemsize
            if body + 3 * size > len(raw):
                break  # a torn last entry: its data write never started
            entries.append((slice(start, stop), [raw[body + i * size: body + (i + 1) * size] for i in range(3)]))
            pos = body + 3 * size
        for sl, blobs in reversed(entries):
            for a, blob in zip(ARRAYS, blobs):
                arr = np.frombuffer(blob, np.float32).reshape(sl.stop - sl.start, *self.shape[1:])
                self._write(a, sl, torch.from_numpy(arr.copy()))
        self.flush()
        path.unlink()
        return True

    def flush(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    @property
    def x(self) -> torch.Tensor:
        """All canvases, memory-mapped read-only (for inspection; the loop uses load/put)."""
        return mapped(self.folder / "x.f32", self.shape)

    def close(self) -> None:
        if self._undo is not None:  # the log stays: an unfinished step is rolled back on the next open
            self._undo.close()
            self._undo = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def mapped(path: Path, shape) -> torch.Tensor:
    """A float32 file as a lazily read, copy-on-write tensor (changes stay in memory)."""
    return torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=torch.float32).view(*shape)


def _config(folder: Path) -> dict | None:
    path = folder / "run.json"
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
        if cfg.get("format") != FORMAT or not isinstance(cfg.get("settings"), dict):
            raise ValueError("unknown layout")
        return cfg
    except (ValueError, OSError) as exc:
        raise RunFolderError(f"checkpoint folder {folder}: run.json is corrupted ({exc}); remove the folder to start "
                             "over") from None


def _prepare(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"checkpoint folder {folder} is a file; store='disk' needs a folder (checkpoint=FOLDER)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"checkpoint folder {folder} cannot be created ({exc.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunFolderError(f"checkpoint folder {folder} is not writable")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OURS)
    if foreign:
        raise RunFolderError(f"checkpoint folder {folder} holds other files ({', '.join(foreign[:3])}); "
                             "use an empty or new folder")


def _allocate(folder: Path, nbytes: int, n_images: int) -> None:
    need = len(ARRAYS) * nbytes
    free = shutil.disk_usage(folder).free
    have = sum((folder / f"{a}.f32").stat().st_size for a in ARRAYS if (folder / f"{a}.f32").exists())
    if need > free + have:
        raise RunFolderError(f"checkpoint folder {folder}: not enough disk space for n_images={n_images} and their "
                             f"RAdam moments (needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free)")
    for a in ARRAYS:
        try:
            with open(folder / f"{a}.f32", "wb") as f:  # truncates: a fresh start begins from zeros
                if nbytes:
                    os.posix_fallocate(f.fileno(), 0, nbytes)  # the space is reserved now, not on a later write
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            raise RunFolderError(f"checkpoint folder {folder}: cannot allocate {a}.f32 ({reason})") from None


def open_run_folder(folder, settings: dict, shape: tuple[int, ...], initial_blocks) -> tuple[DiskStore, dict | None]:
    """The disk store of `folder` and its saved state (None for a fresh start).

    settings: the compared run settings (a folder of another configuration is an error).
    initial_blocks: a callable giving the initial canvases as (slice, tensor) blocks, used on a fresh
    start only (so N images are never in memory at once)."""
    folder = Path(folder)
    _prepare(folder)
    current = json.loads(json.dumps(settings))
    cfg = _config(folder)
    if cfg is not None:
        saved = cfg["settings"]
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            raise RunFolderError(f"checkpoint folder {folder} belongs to another run configuration "
                                 f"({', '.join(diff)}); use another folder or remove it")
        if list(cfg.get("shape", [])) != list(shape):
            raise RunFolderError(f"checkpoint folder {folder}: run.json is corrupted (shape {cfg.get('shape')} for "
                                 f"images of {list(shape)}); remove the folder to start over")
    state = _load_state(folder) if cfg is not None else None
    lock = _lock_step(folder)
    if state is not None and state.get("boot_id") != boot_id() and (
            lock is not None or state.get("synced_step") != state["step"]):
        raise RunFolderError(f"checkpoint folder {folder}: the machine restarted after step {state['step']} before its "
                             f"images reached the disk (last synced at step {state.get('synced_step')}); they cannot "
                             "be trusted: remove the folder to start over")
    if state is None:  # fresh start: (re)write everything
        (folder / "step.lock").unlink(missing_ok=True)
        (folder / "undo.log").unlink(missing_ok=True)
        _allocate(folder, 4 * math.prod(shape), shape[0])
        _atomic_write(folder / "run.json",
                      lambda f: f.write(json.dumps({"format": FORMAT, "settings": current, "shape": list(shape)},
                                                   indent=1).encode()))
    store = DiskStore(folder, shape)
    store.synced_step = 0 if state is None else int(state.get("synced_step", state["step"]))
    for a in ARRAYS:
        size = (folder / f"{a}.f32").stat().st_size
        if size != 4 * math.prod(shape):
            store.close()
            raise RunFolderError(f"checkpoint folder {folder}: {a}.f32 holds {size} bytes, expected "
                                 f"{4 * math.prod(shape)}; remove the folder to start over")
    if state is None:
        for sl, block in initial_blocks():
            store.put(sl, block)
        store.flush()
    elif lock is not None:
        if lock > state["step"] and not store.roll_back():
            store.close()
            raise RunFolderError(f"checkpoint folder {folder} was interrupted inside step {lock} and its undo.log is "
                                 "missing or damaged; it cannot be resumed exactly: remove the folder to start over")
        (folder / "undo.log").unlink(missing_ok=True)  # a finished step's leftover
        (folder / "step.lock").unlink()
    return store, state


def _load_state(folder: Path) -> dict | None:
    path = folder / "state.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        int(state["step"])
        return state
    except Exception as exc:  # noqa: BLE001 - any unreadable state file is the same problem to the user
        raise RunFolderError(f"checkpoint folder {folder}: state.pt is corrupted ({type(exc).__name__}); remove the "
                             "folder to start over") from None


def _lock_step(folder: Path) -> int | None:
    path = folder / "step.lock"
    if not path.exists():
        return None
    try:
        return int(path.read_text())
    except ValueError:
        raise RunFolderError(f"checkpoint folder {folder}: step.lock is corrupted; remove the folder to start "
                             "over") from None


def begin_step(store: DiskStore, step: int) -> None:
    """Mark `step` as being written and start its undo log (before any image of it changes)."""
    store.begin_step()  # first: whenever step.lock exists, its undo.log does
    _atomic_write(store.folder / "step.lock", lambda f: f.write(str(step).encode()))


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def end_step(store: DiskStore, state: dict, sync: bool) -> None:
    """The step's state replaces the last one (after the images are synced to disk when `sync`); then
    the mark and the undo log go."""
    if sync:
        store.flush()
        store.synced_step = int(state["step"])
    state = {**state, "boot_id": boot_id(), "synced_step": store.synced_step}
    _atomic_write(store.folder / "state.pt", lambda f: torch.save(state, f))
    (store.folder / "step.lock").unlink(missing_ok=True)
    store.end_step()


def write_output(store: DiskStore, chunk_size: int, shape: tuple[int, ...], images_of_chunk) -> torch.Tensor:
    """The output images, chunk by chunk into images.f32; returned memory-mapped (lazily read)."""
    path = store.folder / "images.f32"
    tmp = path.with_name("images.f32.tmp")
    try:  # a new file replaces the old one: images returned by an earlier call stay mapped to the old one
        with open(tmp, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 4 * math.prod(shape))  # out of space now, not half-way
            for sl in store.chunks(chunk_size):
                f.write(memoryview(images_of_chunk(sl).to("cpu", torch.float32).contiguous().numpy()).cast("B"))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"checkpoint folder {store.folder}: cannot write images.f32 ({exc.strerror})") from None
    return mapped(path, shape)


def open_output(folder) -> torch.Tensor:
    """A run folder's output images (N, 3, H, W), memory-mapped: read lazily, so sets larger than
    memory can be indexed chunk by chunk."""
    folder = Path(folder)
    cfg = _config(folder)
    if cfg is None:
        raise RunFolderError(f"{folder} is not a run folder (no run.json)")
    n, size = cfg["shape"][0], cfg["settings"].get("image_size")
    shape = (n, 3, *size)
    path = folder / "images.f32"
    if not path.exists() or path.stat().st_size != 4 * math.prod(shape):
        raise RunFolderError(f"checkpoint folder {folder} has no finished output (images.f32); rerun generate with "
                             "checkpoint set to this folder to finish it")
    return mapped(path, shape)
