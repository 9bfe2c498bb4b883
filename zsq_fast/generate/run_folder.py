"""store="disk": a run folder holding the canvases and both RAdam moments as raw float32 files, read
and written chunk by chunk (pread/pwrite: process memory stays at a chunk, the OS page cache does
the rest), and the small run state beside them. The folder is the checkpoint:

    run.json      the run configuration and the image shape, written once when the folder is made
    {x, exp_avg, exp_avg_sq}.{0,1}.f32   two buffers of (N, C, Hc, Wc) float32, C order
    state.pt      step, lr schedule, RNG state, stale cache, loss history; replaced atomically per step
    state.prev.pt the state it replaced (a rank of a sharded run one step ahead of its peers steps back)
    images.f32    the output images (N, C, H, W) float32, written at the end

Double buffering: the images and moments after step s live in buffer s % 2. Step k reads buffer
(k - 1) % 2 and writes its updated chunks to buffer k % 2 (a chunk already written this step is read
from there), and replacing state.pt with step k is the commit. A process killed at any point inside
step k (kill -9 included) leaves state.pt of step k - 1 and its buffer untouched, so the reopened
folder resumes as if the run had stopped after step k - 1 and gives the uninterrupted run's images.
The cost is disk space (two buffers: 6 x 4 bytes per canvas pixel), not writes: each chunk is
written once per step, as an in-place update would (format 1 of this folder wrote an undo log
beside the in-place update: a second write of every chunk per step).

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
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgumentError

FORMAT = 2
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
ARRAYS = ("x", "exp_avg", "exp_avg_sq")
BUFFERS = (0, 1)
_OURS = {"run.json", "state.pt", "state.pt.tmp", "state.prev.pt", "state.prev.pt.tmp", "run.json.tmp",
         "images.f32", "images.f32.tmp",
         *(f"{a}.{b}.f32" for a in ARRAYS for b in BUFFERS)}
COPY_BLOCK = 4096  # images per read/write when a step carries unwritten images over to its buffer


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


def buffer_file(folder: Path, array: str, buffer: int) -> Path:
    return folder / f"{array}.{buffer}.f32"


class DiskStore:
    """The ImageStore interface (n, chunks, load, put, flush) over the double-buffered files of a run
    folder. Not thread-safe: streaming.ChunkStream calls it from one I/O thread at a time."""

    def __init__(self, folder: Path, shape: tuple[int, ...], step: int = 0):
        self.folder, self.shape = folder, tuple(shape)
        self.image_numel = math.prod(shape[1:])
        self._fds = {(a, b): os.open(buffer_file(folder, a, b), os.O_RDWR) for a in ARRAYS for b in BUFFERS}
        self.step = step        # the last finished step: its images are in buffer step % 2
        self._writing = None    # the step being written, between begin_step and end_step
        self._written = None    # per image: already written by that step (then read from its buffer)
        self.synced_step = 0    # the last step whose images were fsynced
        self.io_s = 0.0         # seconds spent in the data files' reads and writes (benchmarks)

    @property
    def n(self) -> int:
        return self.shape[0]

    def chunks(self, chunk_size: int) -> list[slice]:
        return [slice(i, min(i + chunk_size, self.n)) for i in range(0, self.n, chunk_size)]

    def _bounds(self, sl: slice) -> tuple[int, int]:
        start, stop, _ = sl.indices(self.n)
        return start, max(start, stop)

    def _pread(self, name: str, buffer: int, start: int, out: np.ndarray) -> None:
        buf, offset, done = memoryview(out).cast("B"), start * self.image_numel * 4, 0
        t = time.perf_counter()
        while done < len(buf):  # one read call moves at most ~2 GiB
            got = os.preadv(self._fds[name, buffer], [buf[done:]], offset + done)
            if got == 0:
                raise RunFolderError(f"checkpoint folder {self.folder}: {name}.{buffer}.f32 is shorter than its "
                                     f"{self.n} images (truncated?); remove the folder to start over")
            done += got
        self.io_s += time.perf_counter() - t

    def _pwrite(self, name: str, buffer: int, start: int, data: np.ndarray) -> None:
        buf, offset, done = memoryview(data).cast("B"), start * self.image_numel * 4, 0
        t = time.perf_counter()
        try:
            while done < len(buf):
                done += os.pwrite(self._fds[name, buffer], buf[done:], offset + done)
        except OSError as exc:
            raise RunFolderError(f"checkpoint folder {self.folder}: cannot write {name}.{buffer}.f32 "
                                 f"({exc.strerror})") from None
        self.io_s += time.perf_counter() - t

    def read(self, name: str, sl: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """The newest contents of images `sl` of one array, as a CPU tensor (into `out`, a contiguous
        float32 CPU tensor of the right shape, when given: e.g. pinned memory)."""
        start, stop = self._bounds(sl)
        if out is None:
            out = torch.empty((stop - start, *self.shape[1:]), dtype=torch.float32)
        arr = out.numpy()
        current = self.step % 2
        written = None if self._written is None else self._written[start:stop]
        if written is None or not written.any():
            self._pread(name, current, start, arr)
        elif written.all():
            self._pread(name, self._writing % 2, start, arr)
        else:  # a slice across images written and not yet written this step
            self._pread(name, current, start, arr)
            new = np.empty_like(arr)
            self._pread(name, self._writing % 2, start, new)
            arr[written] = new[written]
        return out

    def load(self, sl: slice, device, moments: bool = False):
        """The chunk's images (and moments) on the compute device, as copies."""
        if not moments:
            return self.read("x", sl).to(device)
        return tuple(self.read(a, sl).to(device) for a in ARRAYS)

    def put(self, sl: slice, x, exp_avg=None, exp_avg_sq=None) -> None:
        """Write images `sl` (and their moments): to the step's buffer inside a step, else in place."""
        start, stop = self._bounds(sl)
        arrays = {"x": x, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if self._writing is not None and exp_avg is None:  # the moments move to the step's buffer unchanged
            arrays.update(exp_avg=self.read("exp_avg", sl), exp_avg_sq=self.read("exp_avg_sq", sl))
        buffer = self.step % 2 if self._writing is None else self._writing % 2
        for name, t in arrays.items():
            if t is None:
                continue
            data = t.detach().to("cpu", torch.float32).contiguous().numpy()
            if data.shape[0] != stop - start:
                raise ValueError(f"{name}: {data.shape[0]} images for a slice of {stop - start}")
            self._pwrite(name, buffer, start, data)
        if self._written is not None:
            self._written[start:stop] = True

    def begin_step(self, step: int) -> None:
        if step != self.step + 1:
            raise ValueError(f"step {step} cannot follow step {self.step}")
        self._writing, self._written = step, np.zeros(self.n, dtype=bool)

    def finish_step(self) -> None:
        """Carry the images the step did not write over to its buffer (a step normally writes all)."""
        todo = np.flatnonzero(~self._written)
        for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1) if todo.size else []:
            for start in range(int(run[0]), int(run[-1]) + 1, COPY_BLOCK):
                sl = slice(start, min(start + COPY_BLOCK, int(run[-1]) + 1))
                self.put(sl, *(self.read(a, sl) for a in ARRAYS))

    def commit_step(self) -> None:
        """The step's buffer now holds the newest images (call after state.pt names the step)."""
        self.step, self._writing, self._written = self._writing, None, None

    def flush(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    @property
    def x(self) -> torch.Tensor:
        """All canvases of the last finished step, memory-mapped read-only (for inspection; the loop
        uses load/put)."""
        return mapped(buffer_file(self.folder, "x", self.step % 2), self.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def mapped(path: Path, shape) -> torch.Tensor:
    """A float32 file as a lazily read, copy-on-write tensor (changes stay in memory)."""
    return torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=torch.float32).view(*shape)


def _config(folder: Path) -> dict | None:
    """run.json of a folder of any format this code can read (1: in-place images + undo log, 2: now)."""
    path = folder / "run.json"
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
        if cfg.get("format") not in (1, FORMAT) or not isinstance(cfg.get("settings"), dict):
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
    cfg = _config(folder)
    if cfg is not None and cfg["format"] != FORMAT:
        raise RunFolderError(f"checkpoint folder {folder} was written by an older zsq_fast (run folder format "
                             f"{cfg['format']}, this one reads {FORMAT}); finish it with that version or remove it")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OURS)
    if foreign:
        raise RunFolderError(f"checkpoint folder {folder} holds other files ({', '.join(foreign[:3])}); "
                             "use an empty or new folder")


def _allocate(folder: Path, nbytes: int, n_images: int) -> None:
    """Both buffers of every array, `nbytes` each, reserved on disk now (not on a later write)."""
    files = [buffer_file(folder, a, b) for a in ARRAYS for b in BUFFERS]
    need = len(files) * nbytes
    free = shutil.disk_usage(folder).free
    have = sum(f.stat().st_size for f in files if f.exists())
    if need > free + have:
        raise RunFolderError(f"checkpoint folder {folder}: not enough disk space for n_images={n_images} and their "
                             f"RAdam moments, double-buffered (needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB "
                             "free)")
    for path in files:
        try:
            with open(path, "wb") as f:  # truncates: a fresh start begins from zeros
                if nbytes:
                    os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
            raise RunFolderError(f"checkpoint folder {folder}: cannot allocate {path.name} ({reason})") from None


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
    if state is not None and state.get("boot_id") != boot_id() and state.get("synced_step") != state["step"]:
        raise RunFolderError(f"checkpoint folder {folder}: the machine restarted after step {state['step']} before its "
                             f"images reached the disk (last synced at step {state.get('synced_step')}); they cannot "
                             "be trusted: remove the folder to start over")
    if state is None:  # fresh start (or one killed before its first state.pt): (re)write everything
        _allocate(folder, 4 * math.prod(shape), shape[0])
        _atomic_write(folder / "run.json",
                      lambda f: f.write(json.dumps({"format": FORMAT, "settings": current, "shape": list(shape)},
                                                   indent=1).encode()))
    for a in ARRAYS:
        for b in BUFFERS:
            size = buffer_file(folder, a, b).stat().st_size if buffer_file(folder, a, b).exists() else 0
            if size != 4 * math.prod(shape):
                raise RunFolderError(f"checkpoint folder {folder}: {a}.{b}.f32 holds {size} bytes, expected "
                                     f"{4 * math.prod(shape)}; remove the folder to start over")
    store = DiskStore(folder, shape, step=0 if state is None else int(state["step"]))
    store.synced_step = 0 if state is None else int(state.get("synced_step", state["step"]))
    if state is None:
        for sl, block in initial_blocks():
            store.put(sl, block)
        store.flush()
    return store, state


def _load_state(folder: Path, name: str = "state.pt") -> dict | None:
    path = folder / name
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        int(state["step"])
        return state
    except Exception as exc:  # noqa: BLE001 - any unreadable state file is the same problem to the user
        raise RunFolderError(f"checkpoint folder {folder}: {name} is corrupted ({type(exc).__name__}); remove the "
                             "folder to start over") from None


def begin_step(store: DiskStore, step: int) -> None:
    """Start `step`: its updated chunks go to buffer step % 2, the last step's buffer stays as it is."""
    store.begin_step(step)


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return None


def end_step(store: DiskStore, state: dict, sync: bool) -> None:
    """Commit the step: its buffer complete (and synced to disk when `sync`), then state.pt names it.
    Every write of the step must have reached the store (streaming.ChunkStream drains its loops)."""
    store.finish_step()
    if sync:
        store.flush()
        store.synced_step = int(state["step"])
    state = {**state, "boot_id": boot_id(), "synced_step": store.synced_step}
    _keep_previous_state(store.folder)
    _atomic_write(store.folder / "state.pt", lambda f: torch.save(state, f))
    store.commit_step()


def _keep_previous_state(folder: Path) -> None:
    """The state being replaced stays as state.prev.pt (state.pt itself is never absent), so a rank of a
    sharded run that committed a step its peers did not can step back to theirs (step_back)."""
    current, tmp = folder / "state.pt", folder / "state.prev.pt.tmp"
    if not current.exists():
        return
    tmp.unlink(missing_ok=True)
    try:
        os.link(current, tmp)  # a second name for the same bytes: no copy
    except OSError:
        shutil.copyfile(current, tmp)
    os.replace(tmp, folder / "state.prev.pt")


def step_back(store: DiskStore) -> dict | None:
    """Return the run folder to the step before its last committed one and give that step's state (None:
    the initial canvases, step 0). Its images and moments are still in buffer (step - 1) % 2: the last
    step wrote only the other buffer. For a rank of a sharded run one step ahead of its peers (it
    committed a step whose collectives ended before a peer died)."""
    target = store.step - 1
    if target < 0 or store._writing is not None:
        raise RunFolderError(f"checkpoint folder {store.folder}: cannot step back from step {store.step}")
    if target == 0:  # before the first step: the initial canvases, no state
        (store.folder / "state.prev.pt").unlink(missing_ok=True)
        (store.folder / "state.pt").unlink()
        store.step, store.synced_step = 0, 0
        return None
    state = _load_state(store.folder, "state.prev.pt")
    if state is None or int(state["step"]) != target:
        got = "none" if state is None else f"step {state['step']}"
        raise RunFolderError(f"checkpoint folder {store.folder}: no saved state of step {target} to step back to "
                             f"(state.prev.pt: {got}); remove the folder to start over")
    _atomic_write(store.folder / "state.pt", lambda f: torch.save(state, f))
    store.step, store.synced_step = target, int(state.get("synced_step", target))
    return state


def write_output(store: DiskStore, shape: tuple[int, ...], chunks) -> torch.Tensor:
    """The output images into images.f32, from `chunks`: (slice, images) in order covering all N;
    returned memory-mapped (lazily read)."""
    path = store.folder / "images.f32"
    tmp = path.with_name("images.f32.tmp")
    try:  # a new file replaces the old one: images returned by an earlier call stay mapped to the old one
        with open(tmp, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 4 * math.prod(shape))  # out of space now, not half-way
            for _, images in chunks:
                f.write(memoryview(images.to("cpu", torch.float32).contiguous().numpy()).cast("B"))
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
