"""Triton's interpreter rounding as the GPU rounds: TF32 and bf16 tensor-core operands, bf16 casts.

What the interpreter does (Triton 3.9, triton/runtime/interpreter.py, InterpreterBuilder):
- create_dot ignores input_precision: a TF32 tl.dot on fp32 operands is computed in full fp32;
- bf16 tensors are held as their raw uint16 bits, and create_dot multiplies those bits as
  integers: a bf16 tl.dot is off by factors near 1e10;
- cast_impl turns fp32 into bf16 by dropping the low 16 bits (truncation).
What the GPU does with the kernels' code (sm_80 mma.sync, sm_90 wgmma, Triton 3.9):
- tl.dot(fp32, fp32, input_precision="tf32"): Triton emits no conversion (the PTX of the KL
  kernels has `wgmma ... .tf32.tf32` / `mma ... .tf32.tf32` on the fp32 registers and no
  cvt.rna.tf32.f32); the tensor cores read the top 10 mantissa bits, i.e. each operand is
  truncated toward zero (the behaviour Triton issue #4574 measured against torch's rounded TF32);
- bf16 operands (fp32 cast with .to(tl.bfloat16): cvt.rn.bf16.f32, round to nearest even) are
  multiplied exactly; both accumulate in fp32.

gpu_rounding() patches the interpreter to do the same: TF32 operands truncated to 10 mantissa bits
(tf32="truncate"; "rne" rounds to nearest even instead, for comparison), bf16 bits decoded to their
values, exact products, fp32 accumulation, and fp32 -> bf16 casts rounded to nearest even. Other
arithmetic on bf16 tensors stays wrong in the interpreter, so tests feed fp32 tensors and let the
kernels' MATMUL_MODE (kernels/_common.py) make the bf16 operands.

Error bounds (what test_precision.py checks against, derived, not fitted). An operand a rounded to
a(1 + r) with |r| <= u (the unit roundoff: TF32 truncated u = 2^-10; bf16 nearest u = 2^-8) turns
a product ab into ab(1 + r_a)(1 + r_b), off by at most (2u + u^2)|a||b| (u = 2^-p for p significant
bits rounded to nearest, 2^(1-p) truncated; fp32 2^-24); summing K products in fp32
adds at most gamma_K = K 2^-24 / (1 - K 2^-24) of sum |a||b| (Higham, Accuracy and Stability of
Numerical Algorithms, 3.1). So for C = A @ B, elementwise,

    |C_computed - C| <= (2u + u^2 + gamma_K) (|A| @ |B|)        (matmul_error_bound)

rigorous for any summation order. The mean-zero form c u sqrt(K) ||a|| ||b|| is tighter on random
data but is a statistical statement; truncation errors are not mean-zero (they all point toward 0),
so the worst case is the honest bound here.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

TF32_TRUNCATED_UNIT = 2.0**-10  # 11 significant bits (10 stored), truncated: below one ulp, 2^-10
TF32_NEAREST_UNIT = 2.0**-11  # ... rounded to nearest: half an ulp
BF16_NEAREST_UNIT = 2.0**-8  # 8 significant bits (7 stored), rounded to nearest even: half of 2^-7
FP32_UNIT = 2.0**-24
# torch.set_float32_matmul_precision -> the tensor-core operands' unit roundoff on the GPU
UNIT_ROUNDOFF = {"highest": 0.0, "high": TF32_TRUNCATED_UNIT, "medium": BF16_NEAREST_UNIT}


def fp32_to_tf32(x: np.ndarray, mode: str = "truncate") -> np.ndarray:
    """fp32 values with 10 mantissa bits: the low 13 bits dropped ("truncate") or rounded to
    nearest even ("rne"); inf and NaN pass through."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    if mode == "truncate":
        rounded = bits & np.uint32(0xFFFFE000)
    elif mode == "rne":
        rounded = (bits + np.uint32(0x0FFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    else:
        raise ValueError(f"tf32 must be 'truncate' or 'rne', got {mode!r}")
    return np.where(special, bits, rounded).view(np.float32)


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """The values of bf16 numbers held as uint16 bits (how the interpreter stores bf16)."""
    return (np.ascontiguousarray(bits).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, rounded to nearest even (cvt.rn.bf16.f32; torch's .to(torch.bfloat16));
    NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


@contextlib.contextmanager
def gpu_rounding(tf32: str = "truncate"):
    """Within the block, the interpreter's tl.dot and fp32 -> bf16 casts round as the GPU does
    (module docstring). Kernels must run under the interpreter (TRITON_INTERPRET=1)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl
    tf32_precision = interpreter._ir.INPUT_PRECISION.TF32

    def operand(handle, input_precision):
        if handle.dtype.scalar == tl.bfloat16:
            return bf16_bits_to_fp32(handle.data)
        if handle.dtype.scalar == tl.float32 and input_precision == tf32_precision:
            return fp32_to_tf32(handle.data, tf32)
        return handle.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not {a.dtype.scalar, b.dtype.scalar} <= {tl.float32, tl.bfloat16} or d.dtype.scalar != tl.float32:
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        # exact products (float64 holds them), one fp32 rounding of the sum with the accumulator
        product = np.matmul(operand(a, input_precision).astype(np.float64),
                            operand(b, input_precision).astype(np.float64))
        return interpreter.TensorHandle((product + d.data.astype(np.float64)).astype(np.float32), d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(fp32_to_bf16_bits(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = original_dot, original_cast


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) within the block (the kernels' MATMUL_MODE
    follows it: kernels/_common.matmul_mode)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def gamma(k: int) -> float:
    """Higham's gamma_k for fp32: the relative bound of a k-term fp32 sum's rounding."""
    return k * FP32_UNIT / (1 - k * FP32_UNIT)


def matmul_error_bound(abs_a: torch.Tensor, abs_b: torch.Tensor, unit: float) -> torch.Tensor:
    """Elementwise bound on |computed(A @ B) - A @ B| with operands rounded to ``unit`` and fp32
    accumulation: (2u + u^2 + gamma_K) (|A| @ |B|) (module docstring); float64."""
    k = abs_a.shape[-1]
    return (2 * unit + unit**2 + gamma(k)) * (abs_a.double() @ abs_b.double())
