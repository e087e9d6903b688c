"""Running a test function in several gloo processes (torch.multiprocessing), as torchrun would."""

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

from fastsae.distributed import teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args):
    """fn(rank, world, *args) in `world` gloo processes; re-raises a rank's failure here."""
    port = _free_port()
    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(world, port, errors, fn, args), nprocs=world, join=True)
    if not errors.empty():
        raise AssertionError(errors.get())


def _rank_main(rank, world, port, errors, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), FASTSAE_BACKEND="torch")
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        teardown()
