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

import contextlib
import inspect
from typing import NamedTuple

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
# Launching, or recording the launches instead (the compile check)
#
# Every launcher launches through launch() and picks its configs from gpu_arch() / sm_count().
# Under recorded_launches() nothing runs on a GPU: the launchers, given meta tensors, configure as
# on a CUDA device of the recording's arch and SM count and hand each launch to the record, so
# the compile check compiles exactly what they launch (and a test can check that every launch a
# training step makes has a compile case).


class LaunchRecord(NamedTuple):
    """One launch: the kernel, its runtime arguments by name (tensors and scalars) and its
    constexprs with num_warps / num_stages."""

    kernel: object
    args: dict
    meta: dict


class _Recording(NamedTuple):
    arch: int
    sm_count: int
    launches: list


_RECORDING: _Recording | None = None


@contextlib.contextmanager
def recorded_launches(arch: int = 90, sm_count: int = 132):
    """Within this block launch() launches nothing and appends a LaunchRecord to the yielded list;
    on meta tensors the launchers configure as on a CUDA sm_<arch> device with ``sm_count`` SMs
    (132: H100 / H200 SXM). The launchers never read a device value back, so the ops run through
    on meta tensors: forward, backward and all."""
    global _RECORDING
    previous, _RECORDING = _RECORDING, _Recording(arch, sm_count, [])
    try:
        yield _RECORDING.launches
    finally:
        _RECORDING = previous


def recording_launches() -> bool:
    return _RECORDING is not None


def gpu_arch(device: torch.device) -> int | None:
    """The compute capability (e.g. 90) the launchers configure for: the recording's for a meta
    tensor under recorded_launches(), the device's on CUDA, None on CPU (Triton's interpreter)."""
    if device.type == "meta" and _RECORDING is not None:
        return _RECORDING.arch
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the GPU's (or the recording's); 1 for the interpreter,
    which runs programs one after another."""
    if device.type == "meta" and _RECORDING is not None:
        return _RECORDING.sm_count
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def jit_function(kernel):
    """The @triton.jit function (JITFunction, or the interpreter's InterpretedFunction) under
    @triton.autotune / @triton.heuristics wrappers."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _constexpr_names(fn) -> set:
    if hasattr(fn, "params"):  # JITFunction
        return {p.name for p in fn.params if p.is_constexpr}
    # The interpreter's function: the annotations of the Python function it wraps.
    return {name for name, p in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(p.annotation)}


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs); under recorded_launches() its LaunchRecord instead (the
    outputs are then not written: meta tensors hold no values anyway)."""
    if _RECORDING is None:
        kernel[grid](*args, **kwargs)
        return
    fn = jit_function(kernel)
    constexprs = _constexpr_names(fn)
    named = dict(zip(fn.arg_names, args))
    meta_names = constexprs.union(_LAUNCH_OPTIONS)
    named.update({name: value for name, value in kwargs.items() if name not in meta_names})
    meta = {name: value for name, value in kwargs.items() if name in meta_names}
    meta.setdefault("num_warps", 4)  # Triton's defaults
    meta.setdefault("num_stages", 3)
    _RECORDING.launches.append(LaunchRecord(kernel, named, meta))


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
        fn = jit_function(self.kernel)
        signature, constexprs, attrs = {}, dict(self.meta), {}
        for position, name in enumerate(fn.arg_names):
            if name in self.meta:
                signature[name] = "constexpr"
                continue
            if name not in self.args:
                raise ValueError(f"CompileCase of {self.kernel_name}: no example value for argument {name!r}")
            value = self.args[name]
            if isinstance(value, torch.dtype):
                signature[name] = _POINTER_TYPES[value]
                attrs[(position,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):  # an fp32 scalar: a launch never specialises it
                signature[name] = "fp32"
            elif isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"CompileCase of {self.kernel_name}: argument {name!r} must be a torch.dtype "
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

        fn = jit_function(self.kernel)
        signature, constexprs, attrs = self.signature_and_specialisation()
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)

    @property
    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_launch(cls, record: LaunchRecord, *, hot: bool) -> "CompileCase":
        """The case of a recorded launch (recorded_launches): tensors become their dtypes (meta
        tensors and torch's allocations are 16-byte aligned), scalars stay."""
        args = {name: value.dtype if isinstance(value, torch.Tensor) else value for name, value in record.args.items()}
        meta = dict(record.meta)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        return cls(record.kernel, args, meta, num_warps=warps, num_stages=stages, hot=hot)

    @property
    def kernel_name(self) -> str:
        return jit_function(self.kernel).fn.__name__

    def specialisation(self) -> tuple:
        """What decides the compiled kernel, hashable: two launches with equal specialisations
        compile to one kernel (the kernel, its signature with constexprs and 16-divisibility, warps
        and stages). The same under Triton's interpreter as in a compiling process."""
        signature, constexprs, attrs = self.signature_and_specialisation()
        return (jit_function(self.kernel).fn.__qualname__, tuple(sorted(signature.items())),
                tuple(sorted((name, repr(value)) for name, value in constexprs.items())),
                tuple(sorted((path, repr(value)) for path, value in attrs.items())), self.num_warps, self.num_stages)


# The operand modes the compile check covers: "bf16" (bf16 operands), "tf32" (fp32 operands under
# torch.set_float32_matmul_precision("high"), the trainer's CUDA default) and "ieee" (fp32 FMA by
# request: not a tensor-core config, so not hot). {mode: (dtype, the precision that selects it)}.
COMPILE_MODES = {"bf16": (torch.bfloat16, "high"), "tf32": (torch.float32, "high"),
                 "ieee": (torch.float32, "highest")}


@contextlib.contextmanager
def compile_mode(mode: str):
    """The operand dtype of ``mode`` (COMPILE_MODES), with torch's matmul precision set for the
    block as the trainer sets it for that mode (matmul_mode() reads it)."""
    dtype, precision = COMPILE_MODES[mode]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield dtype
    finally:
        torch.set_float32_matmul_precision(previous)


def meta_parameter(*shape, dtype, transposed: bool = False) -> torch.Tensor:
    """A meta tensor that requires grad; ``transposed``: stored as the transpose of ``shape``
    (E2ESAE keeps W_enc as [n_latents, d_in] and passes W_enc.t())."""
    if transposed:
        return torch.empty(*reversed(shape), dtype=dtype, device="meta").t().requires_grad_()
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)


def record_runs(runs, arch: int, n_sms: int) -> list[tuple[dict, LaunchRecord]]:
    """[(tags, LaunchRecord)] of every launch that runs make under recorded_launches(arch, n_sms).

    runs: (tags, mode, step) triples; step(dtype) runs the launchers on meta tensors (forward and
    backward) with the operand dtype of ``mode`` under its matmul precision (compile_mode)."""
    tagged = []
    for tags, mode, step in runs:
        with compile_mode(mode) as dtype, recorded_launches(arch, n_sms) as launches:
            step(dtype)
        tagged += [(tags, record) for record in launches]
    return tagged


def recorded_cases(tagged, label, hot) -> dict[str, CompileCase]:
    """{name: CompileCase} of recorded launches (record_runs), one per specialisation: the first
    launch of each names it.

    label(tags, record) -> the case's name; hot(record) -> whether it must compile to tensor-core
    MMAs with pipelined loads (tests/compile_check.py)."""
    cases, seen = {}, set()
    for tags, record in tagged:
        case = CompileCase.from_launch(record, hot=hot(record))
        key = case.specialisation()
        if key in seen:
            continue
        name = label(tags, record)
        if name in cases:
            raise ValueError(f"two launches with different specialisations are both named {name!r}: "
                             "the label must say what differs")
        seen.add(key)
        cases[name] = case
    return cases
