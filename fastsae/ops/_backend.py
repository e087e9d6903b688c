"""Backend choice for the functional ops: the Triton kernels or the PyTorch reference.

``auto`` (the default) takes Triton for CUDA tensors when the op has a kernel, and the reference
otherwise. ``FASTSAE_BACKEND=triton|torch`` (or an op's ``backend=`` argument) forces one. With
``TRITON_INTERPRET=1`` set before triton is imported, the Triton path also runs on CPU tensors,
which is how CI tests the kernels without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")

# op name -> (module under fastsae.kernels, attribute holding the autograd entry point)
_KERNELS: dict[str, tuple[str, str]] = {}


def register_kernel(op: str, module: str, attribute: str) -> None:
    """Declare that ``fastsae.kernels.<module>.<attribute>`` implements ``op``."""
    _KERNELS[op] = (module, attribute)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend(backend: str | None = None) -> str:
    choice = backend if backend is not None else os.environ.get("FASTSAE_BACKEND", "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else "FASTSAE_BACKEND"
        raise ValueError(f"{source}={choice!r} is not a backend; expected one of {BACKENDS}")
    return choice


def triton_kernel(op: str):
    """The Triton entry point of ``op``, or None when the op has no kernel (or no triton)."""
    if op not in _KERNELS:
        return None
    module, attribute = _KERNELS[op]
    if importlib.util.find_spec("triton") is None:
        return None
    if importlib.util.find_spec(f"fastsae.kernels.{module}") is None:
        return None
    return getattr(importlib.import_module(f"fastsae.kernels.{module}"), attribute)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(op: str, *tensors: torch.Tensor, backend: str | None = None) -> bool:
    """Decide the backend for one call of ``op`` on ``tensors`` (its floating-point inputs).

    "auto" takes the kernel for CUDA tensors in a kernel dtype (fp32/fp16/bf16; float64 stays on
    the reference). Raises when a forced Triton backend cannot run: no kernel for the op, a
    float64 input, or CPU tensors without the interpreter.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    kernel_dtypes = all(t.dtype in KERNEL_DTYPES for t in tensors)
    if choice == "auto":
        return on_cuda and kernel_dtypes and triton_kernel(op) is not None
    if not kernel_dtypes:
        dtypes = sorted({str(t.dtype) for t in tensors if t.dtype not in KERNEL_DTYPES})
        raise TypeError(f"fastsae.ops.{op}: the Triton kernels take float32/float16/bfloat16 inputs, got "
                        f"{', '.join(dtypes)}; use FASTSAE_BACKEND=torch or backend='torch'")
    if triton_kernel(op) is None:
        raise NotImplementedError(
            f"fastsae.ops.{op}: there is no Triton kernel for this op (or triton is not "
            "installed); use FASTSAE_BACKEND=torch or backend='torch'"
        )
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"fastsae.ops.{op}: the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 "
            "set before triton is imported to run Triton's interpreter on CPU tensors"
        )
    return True


def call_kernel(op: str, *args):
    """Run ``op``'s Triton entry point on ``args`` with the inputs' GPU as the current device.

    Triton launches on the current CUDA device and its stream: without this guard a tensor on
    cuda:1 would be read by a kernel launched on cuda:0. (Backward runs on autograd's thread for
    that device, which sets it already.)
    """
    kernel = triton_kernel(op)
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if first.is_cuda:
        with torch.cuda.device(first.device):
            return kernel(*args)
    return kernel(*args)
