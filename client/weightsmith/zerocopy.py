"""Destination memory for tensors read from the wire: new arrays without fresh-memory costs.

A read into new arrays spends its extra time (over a read into `out=`
arrays) not copying but on fresh memory: the kernel faults in and zeroes
every page of the 553 MB of a VGG16 read (numpy already advises transparent
huge pages for large arrays, so the faults are few; the zeroing and, in a
virtual machine, the host backing the pages again are what is left). On 2
busy cores that was 0.6 to 1.3 s of client CPU per read, against 0.5 s for
the same read into `out=` arrays. Pre-faulting in a background thread
(`MADV_POPULATE_WRITE`) and a mapping advised for huge pages were measured
too and did not help: the same work, on a core the stream needs.

So a tensor of 4 MiB or more gets its own anonymous mapping (advised for
huge pages, as numpy would), and when the last array (or view) on it is
freed the mapping is not unmapped at once but kept in a small pool, its
pages marked `MADV_FREE` (the kernel may take them back whenever it needs
memory; until then they cost nothing to reuse): the next read's tensor of
the same size reuses it, so a client that reads a model again (a monitor,
an export loop) pays what a read into `out=` pays. Kept mappings are unmapped after
`POOL_IDLE_S` seconds unused, beyond `POOL_MAX_BYTES`, and before any new
mapping (as many bytes as it needs): a read reuses kept memory or gives it
back, it never adds to it.

The arrays are ordinary writable numpy arrays the caller owns: a mapping is
reused only once nothing refers to it (numpy views, memoryviews and DLPack
exports all hold a reference). Small tensors, and other platforms, use
`np.empty`.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import sys
import threading
import time
import weakref

import numpy as np

# Below this malloc is as fast, and a mapping per tensor not worth its system calls.
MIN_MAPPED_BYTES = 4 * 1024 * 1024

_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_FREE = getattr(mmap, "MADV_FREE", None)
# Freed mappings kept for reuse: unmapped after this long unused, and beyond this many bytes.
POOL_IDLE_S = 30.0
POOL_MAX_BYTES = 2 << 30

# Whether large tensors get pooled mappings (read at call time; the transfer bench turns it off to
# measure what it saves).
SUPPORTED = sys.platform.startswith("linux") and _HUGEPAGE is not None and _FREE is not None
pooling = SUPPORTED


class _Pool:
    """Freed mappings, oldest first, each with the time it came back.

    `give` runs as a weakref finalizer, in whatever thread dropped the last
    array, possibly inside a garbage collection: it only advises the kernel
    and appends to a deque (atomic), taking no lock. The rest happens under
    the lock in `take` and in a daemon thread that unmaps idle mappings.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._returned: collections.deque[tuple[float, mmap.mmap]] = collections.deque()
        self._kept: list[tuple[float, mmap.mmap]] = []
        self._janitor: threading.Thread | None = None

    def take(self, nbytes: int) -> mmap.mmap | None:
        """A kept mapping of exactly `nbytes`; else None, having unmapped at least as much kept memory."""
        dropped: list[mmap.mmap] = []
        with self._lock:
            self._start_janitor()
            self._drain()
            for index in range(len(self._kept) - 1, -1, -1):
                if len(self._kept[index][1]) == nbytes:
                    return self._kept.pop(index)[1]
            while self._kept and sum(len(m) for m in dropped) < nbytes:
                dropped.append(self._kept.pop(0)[1])
        _unmap(dropped)
        return None

    def give(self, mapping: mmap.mmap) -> None:
        """Keep a mapping that no array uses any more."""
        try:
            mapping.madvise(_FREE)  # type: ignore[arg-type]
        except (OSError, ValueError):
            return  # closed or refused: let it be unmapped when freed
        self._returned.append((time.monotonic(), mapping))

    def clear(self) -> None:
        """Unmap every kept mapping now."""
        with self._lock:
            self._drain()
            dropped = [m for _, m in self._kept]
            self._kept.clear()
        _unmap(dropped)

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            self._drain()
            return sum(len(m) for _, m in self._kept)

    def _drain(self) -> None:
        while self._returned:
            self._kept.append(self._returned.popleft())
        while sum(len(m) for _, m in self._kept) > POOL_MAX_BYTES:
            _unmap([self._kept.pop(0)[1]])

    def after_fork(self) -> None:
        """In a forked child: a fresh lock, and a janitor of its own when next needed."""
        self._lock = threading.Lock()
        self._janitor = None

    def _start_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = threading.Thread(target=self._sweep, name="weightsmith-pool", daemon=True)
            self._janitor.start()

    def _sweep(self) -> None:
        while True:
            time.sleep(POOL_IDLE_S / 4)
            deadline = time.monotonic() - POOL_IDLE_S
            with self._lock:
                self._drain()
                dropped = [m for t, m in self._kept if t <= deadline]
                self._kept = [(t, m) for t, m in self._kept if t > deadline]
            _unmap(dropped)


def _unmap(mappings: list[mmap.mmap]) -> None:
    for mapping in mappings:
        # Still exported by an array being torn down: unmapped when that is freed.
        with contextlib.suppress(BufferError):
            mapping.close()


POOL = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL.after_fork)


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised, writable, C-contiguous array for a tensor about to arrive."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not pooling or nbytes < MIN_MAPPED_BYTES:
        return np.empty(shape, dtype=dtype)
    mapping = POOL.take(nbytes)
    if mapping is None:
        try:
            mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mapping.madvise(_HUGEPAGE)  # type: ignore[arg-type]
        except (OSError, ValueError, OverflowError):
            return np.empty(shape, dtype=dtype)  # no address space or no THP: numpy says why, if anything
    flat = np.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize)
    # Every array and view of this tensor keeps `flat` alive: once it goes, nothing uses the pages.
    finalizer = weakref.finalize(flat, POOL.give, mapping)
    finalizer.atexit = False  # at exit arrays may still be in use: never advise their pages free
    return flat.reshape(shape)


def transparent_huge_pages() -> str:
    """The machine's THP mode (`always`, `madvise`, `never`), or '' where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            text = file.read()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else ""
