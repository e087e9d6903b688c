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


def use_triton(op: str, *tensors: torch.Tensor, backend: str | None = None) -> bool:
    """Decide the backend for one call of ``op`` on ``tensors``.

    Raises when a forced Triton backend cannot run: no kernel for the op, or CPU tensors
    without the interpreter.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return on_cuda and triton_kernel(op) is not None
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
