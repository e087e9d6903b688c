"""A TorchDispatchMode that records the shape of every tensor the aten ops allocate.

Used to show that no [N, n_latents] or [N, d_vocab] tensor is ever built: views and in-place
results share an input's storage and are not new allocations, so they are left out.

A dispatch mode is thread-local, and the CPU references run their chunks on worker threads
(fastsae/ops/_workers.py) when torch has more than one thread: while recording, torch has one, so
every chunk runs in the recording thread.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []
        self._threads = None

    def __enter__(self):
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the chunks run inline, where the mode sees them
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch.set_num_threads(self._threads)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        input_storages = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                          if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages:
                self.shapes.append(tuple(t.shape))
        return out
