"""Pieces every kernel file shares: how fp32 operands meet the tensor cores.

This module sits at the bottom of the package (it imports torch and triton only), so kernels and
the ops above them can both use it. Kernels never import fastsae.ops.

Matmul precision follows torch's own switch, so one setting governs cuBLAS and fastsae alike:

    torch.set_float32_matmul_precision("highest")  -> "ieee": fp32 FMA on CUDA cores (exact fp32)
    torch.set_float32_matmul_precision("high")     -> "tf32": TF32 tensor cores (10-bit mantissa
                                                      operands, fp32 accumulation)
    torch.set_float32_matmul_precision("medium")   -> "bf16": fp32 operands rounded to bf16 in
                                                      the tile, fp32 accumulation

torch's default is "highest"; fastsae's trainer sets "high" on CUDA unless its config says
otherwise. fp16 / bf16 operands always run on tensor cores with fp32 accumulation: the mode only
matters for fp32 operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MATMUL_MODES = ("ieee", "tf32", "bf16")
_MODE_OF_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def matmul_mode(dtype: torch.dtype) -> str:
    """The MATMUL_MODE constexpr for a kernel whose operands have ``dtype``."""
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit operands; one value keeps one compiled variant
    return _MODE_OF_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


@triton.jit
def mma(a, b, acc, MATMUL_MODE: tl.constexpr):
    """acc + a @ b with fp32 accumulation, operands treated as MATMUL_MODE says (see above)."""
    if MATMUL_MODE == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif MATMUL_MODE == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="tf32")


# --------------------------------------------------------------------------------------------
# The device the launchers configure for


def gpu_arch(device: torch.device) -> int | None:
    """The compute capability (e.g. 90) of a CUDA device; None elsewhere (Triton's interpreter on
    CPU tensors takes its own small tiles)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the GPU's; 1 for the interpreter, which runs programs one
    after another."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
