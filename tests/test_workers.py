"""fastsae/ops/_workers.py: chunks on single-threaded workers, in order where it matters."""

import os
import signal
import threading
import time

import pytest
import torch

from fastsae.ops import _workers

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_results_come_back_in_chunk_order_and_the_thread_count_is_restored(two_threads):
    def chunk(index):
        time.sleep(0.01 * (5 - index))  # later chunks finish first
        return index, torch.get_num_threads(), threading.current_thread().name

    results = _workers.map_chunks(chunk, 5, CPU)
    assert [index for index, _, _ in results] == list(range(5))
    assert all(threads == 1 for _, threads, _ in results)  # each worker's ops on one thread
    assert {name.split("_")[0] for _, _, name in results} == {"fastsae-chunk"}
    assert torch.get_num_threads() == 2


def test_one_worker_or_one_chunk_runs_inline():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _workers.map_chunks(lambda i: threading.current_thread() is threading.main_thread(), 3, CPU) == [True] * 3
    finally:
        torch.set_num_threads(threads)
    assert _workers.map_chunks(lambda i: threading.current_thread() is threading.main_thread(), 1, CPU) == [True]


def test_work_started_inside_a_worker_runs_inline(two_threads):
    inner = _workers.map_chunks(lambda i: _workers.map_chunks(lambda j: _workers.worker_count(CPU), 3, CPU), 2, CPU)
    assert inner == [[1, 1, 1], [1, 1, 1]]


def test_an_error_in_a_chunk_is_raised_after_the_started_chunks_finish(two_threads):
    finished = []

    def chunk(index):
        if index == 1:
            raise ValueError("chunk 1 broke")
        time.sleep(0.02)
        finished.append(index)

    with pytest.raises(ValueError, match="chunk 1 broke"):
        _workers.map_chunks(chunk, 6, CPU)
    assert torch.get_num_threads() == 2
    assert 0 in finished  # the chunk running beside it was not abandoned


def test_in_order_accumulation_is_the_same_every_run(two_threads):
    """Float sums depend on their order: InOrder adds chunk i after chunk i - 1 whatever order the
    chunks finish in, so the total is bitwise the same."""
    values = [torch.tensor([1e8, 1.0, -1e8, 3.0, 1e-3, 7.0][i], dtype=torch.float32) for i in range(6)]

    def run():
        total = torch.zeros((), dtype=torch.float32)
        order = _workers.InOrder()
        seen = []

        def accumulate(index_value):
            index, value = index_value
            seen.append(index)
            total.add_(value)

        def compute(index):
            time.sleep(0.005 * ((index * 7) % 4))
            return index, values[index]

        _workers.map_chunks(lambda i: order.run(i, lambda: compute(i), accumulate), 6, CPU)
        return total, seen

    (first, seen), (second, _) = run(), run()
    assert seen == list(range(6))
    assert torch.equal(first, second)


def test_in_order_keeps_moving_past_a_failed_chunk(two_threads):
    order = _workers.InOrder()
    added = []

    def compute(index):
        if index == 0:
            raise RuntimeError("no")
        return index

    with pytest.raises(RuntimeError):
        _workers.map_chunks(lambda i: order.run(i, lambda: compute(i), added.append), 2, CPU)
    assert added == [1]  # chunk 1 got its turn after chunk 0 failed


def test_buffer_pool_lends_each_set_to_one_chunk_at_a_time(two_threads):
    made = []
    pool = _workers.BufferPool(lambda: made.append(1) or object())
    in_use = set()
    lock = threading.Lock()

    def chunk(index):
        with pool.borrow() as buffers:
            with lock:
                assert id(buffers) not in in_use
                in_use.add(id(buffers))
            time.sleep(0.01)
            with lock:
                in_use.discard(id(buffers))

    _workers.map_chunks(chunk, 8, CPU)
    assert len(made) <= 2  # one set per worker


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_workers(two_threads):
    _workers.map_chunks(lambda i: i, 2, CPU)  # the parent's pool exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (a DataLoader worker, say) holds none of the parent's worker threads
        signal.alarm(30)  # a hang is killed, not waited for
        try:
            os.write(write, str(sum(_workers.map_chunks(lambda i: i, 4, CPU))).encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 16) == b"6" and status == 0
