"""Chunked CPU work that a shared machine cannot stall: independent chunks on single-threaded workers.

torch runs each CPU op as an OpenMP parallel region: the op's work is split evenly between the
threads, which meet at a barrier when it ends. On a machine with any other runnable process one of
those threads is often descheduled, and the others wait for it at the barrier, op after op: the
PyTorch references (thousands of ops a call) took up to 8x the naive form's time on the project's
2-core machine with other jobs running, where the naive form (few large ops) slowed down gracefully
(GUIDE section 3).

map_chunks runs a reference's chunks (each a whole unit of work: its matmuls and its elementwise
math) on a pool of as many workers as torch has threads, each worker's ops on one thread. A chunk
never waits for another, and the pool hands the next chunk to whichever worker is free, so a
descheduled worker delays only its own chunk while the others go on. Idle, this is as fast as the
ops' own threading (each worker's matmul runs on its own core); shared, it degrades with the CPU
time the process gets, not with the number of barriers.

While the workers run, torch's global thread count is 1 (set_num_threads also sets the BLAS
library's); the caller's count is restored when they are done. Grad mode is off in the workers
(a chunk computes values, never a graph).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import threading
from typing import Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_IN_WORKER = threading.local()
if hasattr(os, "register_at_fork"):  # a forked child (a DataLoader worker) has none of the pools' threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def worker_count(device: torch.device) -> int:
    """How many workers map_chunks uses for work on ``device``: torch's thread count on CPU (1 inside
    a worker, so work started there runs inline), 1 elsewhere (a GPU orders its own work)."""
    if device.type != "cpu" or getattr(_IN_WORKER, "active", False):
        return 1
    return max(1, torch.get_num_threads())


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fastsae-chunk")
        return _POOLS[workers]


def _run_in_worker(fn: Callable[[int], T], index: int) -> T:
    _IN_WORKER.active = True
    torch.set_num_threads(1)  # this thread's OpenMP team: itself (the global count is 1 already)
    try:
        with torch.no_grad():
            return fn(index)
    finally:
        _IN_WORKER.active = False


def map_chunks(fn: Callable[[int], T], n_chunks: int, device: torch.device) -> list[T]:
    """[fn(0), ..., fn(n_chunks - 1)]: on CPU on worker_count(device) single-threaded workers, the
    chunks handed out in order as workers free up; inline where there is one worker or one chunk.
    The chunks must be independent (each writes only its own rows). An exception raised by a chunk
    is raised here (the first in chunk order), after every started chunk has finished."""
    workers = min(worker_count(device), n_chunks)
    if workers <= 1:
        return [fn(index) for index in range(n_chunks)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_pool(workers).submit(_run_in_worker, fn, index) for index in range(n_chunks)]
        try:
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        finally:
            for future in futures:
                future.cancel()  # the chunks not started yet, after an error or an interrupt
            concurrent.futures.wait(futures)
        return [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)


def chunk_bounds(n_rows: int, rows_per_chunk: int) -> Sequence[tuple[int, int]]:
    """(start, end) of each chunk of at most rows_per_chunk rows."""
    return [(start, min(start + rows_per_chunk, n_rows)) for start in range(0, n_rows, max(1, rows_per_chunk))]


class BufferPool:
    """Scratch buffers for the chunks of one call, one set per worker: a worker borrows a set for a
    chunk and returns it, so each set is made once (fresh multi-MiB buffers page-fault on every
    use) and no two chunks share one at a time."""

    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[T]:
        try:
            buffers = self._free.get_nowait()
        except queue.Empty:
            buffers = self._make()
        try:
            yield buffers
        finally:
            self._free.put(buffers)


class InOrder:
    """Accumulation into shared tensors in chunk order, from chunks computed in any order: chunk i's
    accumulate() runs after chunk i - 1's, so a sum over chunks rounds the same every run (exact
    resumes depend on it), while the chunks' own work overlaps. Chunks start in index order
    (map_chunks hands them out so), so a chunk never waits on one that has not started."""

    def __init__(self):
        self._next = 0
        self._turn = threading.Condition()

    def run(self, index: int, compute: Callable[[], T], accumulate: Callable[[T], None]) -> None:
        try:
            result = compute()
        except BaseException:
            with self._turn_of(index):  # keep the order moving for the chunks after this one
                pass
            raise
        with self._turn_of(index):
            accumulate(result)

    @contextlib.contextmanager
    def _turn_of(self, index: int) -> Iterator[None]:
        with self._turn:
            self._turn.wait_for(lambda: self._next == index)
        try:
            yield
        finally:
            with self._turn:
                self._next = index + 1
                self._turn.notify_all()
