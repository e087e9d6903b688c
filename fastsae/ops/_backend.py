"""Backend choice for the functional ops: the Triton kernels or the PyTorch reference.

``auto`` (the default) takes Triton for CUDA tensors when the op has a kernel, and the reference
otherwise. ``FASTSAE_BACKEND=triton|torch`` (or an op's ``backend=`` argument) forces one. With
``TRITON_INTERPRET=1`` set before triton is imported, the Triton path also runs on CPU tensors,
which is how CI tests the kernels without a GPU.

Measured dispatch. Where an op's fused kernel is not sure to beat its reference on every GPU, the
op asks measured_fastest() under ``auto``: benchmarks/gpu_check.py times the op's variants on a
GPU and records them in MEASURED_DISPATCH (fastsae/ops/measured_dispatch.json, shipped with the
package) as

    {op: {device name (torch.cuda.get_device_name): {shape class: [
        {"N": tokens, "seconds": {variant: median seconds per call}, "fastest": variant, ...}]}}}

The shape class is the op's own key (fused_linear_kl: dtype, matmul precision, d, V, passes); the
entry nearest the call's token count (log scale) answers. With no entry for the device and shape
class the op keeps its default, the fused kernel. A forced backend never consults the record.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch

from fastsae._files import atomic_write_text, read_json_object

BACKENDS = ("auto", "triton", "torch")


def missing_triton(error: ImportError) -> None:
    """None, where ``error`` (raised by importing an op's kernel module) comes from triton: not
    installed (silently: the kernels are optional and the references run everywhere), or installed
    but failing to import (a warning, once per op: CPU use must not break on a broken GPU stack).
    An error of the kernel module itself raises.

        try:
            from fastsae.kernels import topk_encoder as kernels
        except ImportError as error:
            kernels = missing_triton(error)
    """
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "triton":
        return None
    try:
        import triton  # noqa: F401
    except Exception as triton_error:  # triton itself is broken: not the kernel module
        warnings.warn(f"triton does not import ({type(triton_error).__name__}: {triton_error}); the Triton kernels "
                      "are off and the PyTorch references run", RuntimeWarning, stacklevel=2)
        return None
    raise error


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend(backend: str | None = None) -> str:
    choice = backend if backend is not None else os.environ.get("FASTSAE_BACKEND", "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        source = "backend" if backend is not None else "FASTSAE_BACKEND"
        raise ValueError(f"{source}={choice!r} is not a backend; expected one of {BACKENDS}")
    return choice


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(op: str, kernels, *tensors: torch.Tensor, backend: str | None = None) -> bool:
    """Decide the backend for one call of ``op`` on ``tensors`` (its floating-point inputs).

    kernels: the op's kernel module (fastsae.kernels.<name>), None where triton is not installed.
    "auto" takes the kernel for CUDA tensors in a kernel dtype (fp32/fp16/bf16; float64 stays on
    the reference). Raises when a forced Triton backend cannot run: no kernel for the op, a float64
    input, or CPU tensors without the interpreter.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    kernel_dtypes = all(t.dtype in KERNEL_DTYPES for t in tensors)
    if choice == "auto":
        return on_cuda and kernel_dtypes and kernels is not None
    if not kernel_dtypes:
        dtypes = sorted({str(t.dtype) for t in tensors if t.dtype not in KERNEL_DTYPES})
        raise TypeError(f"fastsae.ops.{op}: the Triton kernels take float32/float16/bfloat16 inputs, got "
                        f"{', '.join(dtypes)}; use FASTSAE_BACKEND=torch or backend='torch'")
    if kernels is None:
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


def call_kernel(kernel, *args):
    """Run a Triton entry point (``kernel``) on ``args`` with the inputs' GPU as the current device.

    Triton launches on the current CUDA device and its stream: without this guard a tensor on
    cuda:1 would be read by a kernel launched on cuda:0. (Backward runs on autograd's thread for
    that device, which sets it already.)
    """
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if first.is_cuda:
        with torch.cuda.device(first.device):
            return kernel(*args)
    return kernel(*args)


# ------------------------------------------------------------------------------- measured dispatch

MEASURED_DISPATCH = Path(__file__).with_name("measured_dispatch.json")
_RECORD_CACHE: dict = {}  # path -> (mtime, record)


def device_name(tensor: torch.Tensor) -> str:
    """The record's device key: torch.cuda.get_device_name of a CUDA tensor's GPU, else "cpu"."""
    return torch.cuda.get_device_name(tensor.device) if tensor.is_cuda else "cpu"


def _read_record(path: Path) -> dict:
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return {}
    cached = _RECORD_CACHE.get(path)
    if cached is None or cached[0] != mtime:
        cached = (mtime, read_json_object(path))
        _RECORD_CACHE[path] = cached
    return cached[1]


def measured_fastest(op: str, device: str, shape_class: str, n_tokens: int, variants, *,
                     path: Path | None = None) -> str | None:
    """The fastest of ``variants`` in the record of ``op`` on ``device`` at ``shape_class``, from
    the measurement whose token count is nearest ``n_tokens`` (log scale); None where the record
    has no such entry or times none of the variants (the caller keeps its default)."""
    entries = _read_record(path or MEASURED_DISPATCH).get(op, {}).get(device, {}).get(shape_class)
    if not entries:
        return None
    nearest = min(entries, key=lambda e: abs(math.log(max(1, e["N"])) - math.log(max(1, n_tokens))))
    seconds = {v: nearest["seconds"][v] for v in variants if nearest["seconds"].get(v) is not None}
    return min(seconds, key=seconds.get) if seconds else None


def record_measurement(op: str, device: str, shape_class: str, n_tokens: int, seconds: dict, *,
                       path: Path | None = None, **info) -> dict:
    """Add one measurement (median seconds per call by variant) to the record, replacing one at the
    same token count; written atomically. Returns the entry."""
    path = Path(path or MEASURED_DISPATCH)
    record = read_json_object(path) if path.exists() else {}
    entry = dict(N=int(n_tokens), seconds=dict(seconds), fastest=min(seconds, key=seconds.get), **info)
    entries = record.setdefault(op, {}).setdefault(device, {}).setdefault(shape_class, [])
    entries[:] = [e for e in entries if e["N"] != entry["N"]] + [entry]
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return entry
