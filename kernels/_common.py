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
# Compile cases: what a launch compiles, for compiling without a GPU (tests/compile_check.py)

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8"}


class CompileCase:
    """One kernel launch as the launcher would make it, reduced to what triton.compile needs.

    ``args`` maps every runtime argument of the kernel to an example value: a torch.dtype stands
    for a tensor argument (a pointer; torch's allocations are 16-byte aligned, so the launch marks
    it 16-divisible), an int for an int argument. The specialisation is the one a launch applies:
    an int equal to 1 becomes a constant (so a unit stride turns into contiguous, vectorisable
    addresses) and an int divisible by 16 gets ``tt.divisibility = 16``. ``meta`` holds the
    kernel's constexprs. ``hot`` marks the configs that must compile to tensor-core MMAs with
    pipelined loads and no spills (see the issue's compile targets).
    """

    def __init__(self, kernel, args: dict, meta: dict, *, num_warps: int, num_stages: int, hot: bool = False):
        self.kernel, self.args, self.meta = kernel, dict(args), dict(meta)
        self.num_warps, self.num_stages, self.hot = num_warps, num_stages, hot

    def signature_and_specialisation(self) -> tuple[dict, dict, dict]:
        """(signature, constexprs, attrs) in triton.compiler.ASTSource's terms."""
        fn = self.kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
            fn = fn.fn
        signature, constexprs, attrs = {}, dict(self.meta), {}
        for position, name in enumerate(fn.arg_names):
            if name in self.meta:
                signature[name] = "constexpr"
                continue
            if name not in self.args:
                raise ValueError(f"CompileCase of {fn.__name__}: no example value for argument {name!r}")
            value = self.args[name]
            if isinstance(value, torch.dtype):
                signature[name] = _POINTER_TYPES[value]
                attrs[(position,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):  # an fp32 scalar: a launch never specialises it
                signature[name] = "fp32"
            elif isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"CompileCase of {fn.__name__}: argument {name!r} must be a torch.dtype "
                                f"(a tensor), an int or a float, got {value!r}")
            elif value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i64" if abs(value) >= 2**31 else "i32"
                if value % 16 == 0:
                    attrs[(position,)] = [["tt.divisibility", 16]]
        return signature, constexprs, attrs

    def source(self):
        """The triton.compiler.ASTSource a launch with these arguments compiles."""
        from triton.compiler import ASTSource

        fn = self.kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
            fn = fn.fn
        signature, constexprs, attrs = self.signature_and_specialisation()
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)

    @property
    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def dtype_name(dtype: torch.dtype) -> str:
    """bf16 / fp16 / fp32: the short names compile case keys use."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
