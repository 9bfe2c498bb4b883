"""Chunks between the image store and the compute device, with the store's I/O and the copies
overlapping the compute.

ChunkStream.chunks(slices) yields each chunk on the device while the next one is being fetched;
put() hands an updated chunk back without waiting for it to land:

- a disk store gets one I/O thread: it reads the next chunk ahead (into pinned host memory when a
  GPU computes) and writes updated chunks behind. Reads and writes run one at a time in the order
  they were asked for, so a read asked for after a write of the same images sees that write.
- on CUDA with a host or disk store, the host <-> device copies run on one side stream: the next
  chunk is copied in while this one computes; an event orders the compute stream after the copy,
  and record_stream tells the caching allocator which stream still uses a buffer. Updated chunks go
  device -> pinned host memory on the same side stream, so a later copy of the chunk to the device is
  ordered after it.
- on CPU with a host store, and for a store on the compute device, nothing overlaps: plain loads
  and writes (the same iterator, no streams, no thread).

A chunks() loop that runs to its end drains the stream (every write is in the store) before it
returns, so a step's end (run folder state, checkpoint) sees all its writes. Tensors handed to put()
must not be modified afterwards (their write may still be in flight).
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .store import ImageStore

# Overlap where it can (module switch: the tests compare against the plain path)
OVERLAP = True
# updated chunks whose write may be in flight at once (each holds its tensors until written)
MAX_PENDING_WRITES = 2


class ChunkStream:
    def __init__(self, store, device, overlap: bool | None = None):
        self.store, self.device = store, torch.device(device)
        overlap = OVERLAP if overlap is None else overlap
        self.disk = not isinstance(store, ImageStore)
        # a host (CPU) or disk store feeding a GPU; a device store is read and written in place
        cuda = self.device.type == "cuda" and (self.disk or store.x.device.type == "cpu")
        self.copy_stream = torch.cuda.Stream(self.device) if overlap and cuda else None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="zsq-store-io") if overlap and self.disk else None
        self._writes: deque[Future] = deque()  # disk writes handed to the I/O thread, oldest first
        self.waited_s = 0.0  # seconds the caller spent blocked on the I/O thread (the I/O it did not hide)
        self._last_put = None  # (start, stop, images) of the newest put: a read of exactly it needs no I/O

    @property
    def overlapped(self) -> bool:
        return self.copy_stream is not None or self._io is not None

    # --- reading -----------------------------------------------------------------------------------
    def chunks(self, slices, moments: bool = False):
        """(slice, chunk) on the compute device for every slice in order; the chunk is the images, or
        (images, exp_avg, exp_avg_sq) with `moments`. Every chunk is a copy the caller may modify."""
        slices = list(slices)
        if not self.overlapped:
            for sl in slices:
                yield sl, self.load(sl, moments)
            self.drain()
            return
        todo = deque(slices)
        fetching = deque()  # (slice, host chunk or its future): store reads asked for, oldest first
        staged = None       # (slice, device tensors, event): its copy to the device is issued (CUDA)

        def fetch_next():
            if todo:
                sl = todo.popleft()
                fetching.append((sl, self._fetch(sl, moments)))

        def stage():
            sl, host = fetching.popleft()
            fetch_next()
            return (sl, *self._to_device(host))

        fetch_next()
        if self.copy_stream is not None:
            staged = stage()
        # while chunk i computes: CPU reads chunk i + 1; CUDA copies i + 1 to the device and reads i + 2
        while fetching or staged is not None:
            if self.copy_stream is None:
                current = stage()
            else:
                current, staged = staged, (stage() if fetching else None)
            sl, tensors, event = current
            yield sl, self._ready(tensors, event, moments)
        self.drain()

    def load(self, sl: slice, moments: bool = False):
        """One chunk on the device (images, or the 3-tuple with moments), after every earlier write."""
        if not self.overlapped:
            return self.store.load(sl, self.device, moments=moments)
        last = self._last_put
        if not moments and last is not None and last[:2] == (sl.start, sl.stop):
            return last[2].clone()  # the images just written (stale refresh reads its chunk back)
        return self._ready(*self._to_device(self._fetch(sl, moments)), moments)

    def _fetch(self, sl: slice, moments: bool):
        """The chunk in host memory: views of a host store, else a future of the disk reads."""
        names = ("x", "exp_avg", "exp_avg_sq") if moments else ("x",)
        if not self.disk:
            return tuple(getattr(self.store, name)[sl] for name in names)
        pinned = self.copy_stream is not None

        def read():
            out = []
            for name in names:
                t = None
                if pinned:
                    start, stop, _ = sl.indices(self.store.n)
                    t = torch.empty((stop - start, *self.store.shape[1:]), dtype=torch.float32, pin_memory=True)
                out.append(self.store.read(name, sl, out=t))
            return tuple(out)
        return self._io.submit(read) if self._io is not None else _done(read())

    def _to_device(self, host):
        """Start the copy of a fetched chunk to the device: (tensors, event or None)."""
        arrays = self._wait(host) if isinstance(host, Future) else host
        if self.copy_stream is None:  # CPU: the disk read is the chunk; a host store's views are copied
            return tuple(a.to(self.device, copy=not self.disk) for a in arrays), None
        with torch.cuda.stream(self.copy_stream):
            tensors = tuple(a.to(self.device, non_blocking=True, copy=True) for a in arrays)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return tensors, event

    def _ready(self, tensors, event, moments: bool):
        """The chunk as the compute stream may use it."""
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in tensors:  # allocated on the side stream, used and freed on the compute stream
                t.record_stream(compute)
        return tensors if moments else tensors[0]

    # --- writing -----------------------------------------------------------------------------------
    def put(self, sl: slice, x, exp_avg=None, exp_avg_sq=None) -> None:
        """Write the chunk back to the store; returns before the write lands when overlapping."""
        tensors = tuple(t for t in (x, exp_avg, exp_avg_sq) if t is not None)
        self._last_put = (sl.start, sl.stop, x) if self.overlapped else None
        if self.copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            self.copy_stream.wait_stream(compute)  # the kernels that computed the chunk come first
            with torch.cuda.stream(self.copy_stream):
                if self.disk:
                    host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                                 for t in tensors)
                    copied = torch.cuda.Event()
                    copied.record(self.copy_stream)
                else:  # straight into the host store's pinned memory
                    for name, t in zip(("x", "exp_avg", "exp_avg_sq"), tensors):
                        getattr(self.store, name)[sl].copy_(t, non_blocking=True)
            for t in tensors:  # the compute stream may free them before the copy has run
                t.record_stream(self.copy_stream)
            if not self.disk:
                return
            tensors = host
        else:
            copied = None
        if self._io is None:
            self.store.put(sl, *tensors)
            return
        while len(self._writes) >= MAX_PENDING_WRITES:  # bound the memory held by writes in flight
            self._wait(self._writes.popleft())
        self._writes.append(self._io.submit(self._write, copied, sl, tensors))

    def _write(self, copied, sl, tensors) -> None:
        if copied is not None:
            copied.synchronize()  # the device -> pinned copy has landed
        self.store.put(sl, *tensors)

    def drain(self) -> None:
        """Wait until every write handed to put() is in the store (raises a failed write's error)."""
        self._last_put = None
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        while self._writes:
            self._wait(self._writes.popleft())

    def _wait(self, future: Future):
        t = time.perf_counter()
        try:
            return future.result()
        finally:
            self.waited_s += time.perf_counter() - t

    def close(self) -> None:
        """Stop the I/O thread after the work it was given; a failed write's error is not raised here
        (close runs when a step has already failed, and an unfinished step is never committed)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self._writes.clear()


def _done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


def stream_of(run) -> ChunkStream:
    """The run's chunk stream (made on first use, for the run's store and device)."""
    if run.stream is None or run.stream.store is not run.store:
        run.stream = ChunkStream(run.store, run.device)
    return run.stream
