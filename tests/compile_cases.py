"""What the compile check compiles: every launch the launchers make on a GPU, recorded without one.

The launchers in kernels/ configure from the device (gpu_arch, sm_count) and launch with
``kernel[grid](...)``. recorded_launches() wraps them from outside, for the length of a with-block:

- the kernels' arch and SM-count queries answer for meta tensors as a CUDA sm_<arch> device with
  ``sm_count`` SMs would (132: H100 / H200 SXM);
- the ops' backend choice (fastsae.ops.*.use_triton) takes the kernel for meta tensors as it does
  for CUDA ones;
- a launch (JITFunction.run, or the interpreter's) launches nothing and appends a LaunchRecord.

The launchers never read a device value back, so the ops run through on meta tensors, forward,
backward and all, and what is recorded is exactly what they launch. Nothing of this is in the
production modules: they only launch.

The cases (CASES, one function per op's kernel file): each runs its op's autograd functions on
meta tensors under recorded_launches(arch) for the shapes below, and keeps one CompileCase per
specialisation (recorded_cases), named to say the kernel, the shape, the variant and the operand
mode (e.g. "topk_fwd-gpt2-k32-tf32"), ``hot`` where it carries the step's FLOPs. The shapes: the
GPT-2 preset (d = 768, n = 46,080, k = 32, N = 16,384 tokens, V = 50,257) and a d = 4,096 model
(n = 131,072, V = 128,256), k = 16..256 for TopK, bf16 operands and fp32 ones under TF32 (plus
full-fp32 "ieee" cases, not hot): COMPILE_MODES.

This module is longer than the house's ~400 lines because it holds the recording, the compile
case and the five ops' cases, which must stay in step with each other.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from typing import NamedTuple
from unittest import mock

import torch

KERNEL_MODULES = ("topk_encoder", "relu_encoder", "sparse_decoder", "relu_autoencoder", "linear_kl")
OP_MODULES = ("topk_encoder", "relu_encoder", "sparse_decoder", "relu_autoencoder", "linear_kl")
H100_SMS = 132  # an H100 / H200 SXM's SMs: the split and slice counts a launch there would pick


# --------------------------------------------------------------------------------------------
# Recording the launches


class LaunchRecord(NamedTuple):
    """One launch: the kernel, its runtime arguments by name (tensors and scalars) and its
    constexprs with num_warps / num_stages."""

    kernel: object
    args: dict
    meta: dict


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


def _launch_record(kernel, args, kwargs) -> LaunchRecord:
    fn = jit_function(kernel)
    constexprs = _constexpr_names(fn)
    named = dict(zip(fn.arg_names, args))
    meta_names = constexprs.union(_LAUNCH_OPTIONS)
    named.update({name: value for name, value in kwargs.items() if name not in meta_names})
    meta = {name: value for name, value in kwargs.items() if name in meta_names}
    meta.setdefault("num_warps", 4)  # Triton's defaults
    meta.setdefault("num_stages", 3)
    return LaunchRecord(kernel, named, meta)


def _jit_classes() -> list:
    """The classes whose run() a ``kernel[grid](...)`` launch calls: JITFunction, and the
    interpreter's InterpretedFunction (the kernels' class where TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter
        return classes
    return classes + [InterpretedFunction]


def _loaded(prefix: str, names) -> list:
    return [importlib.import_module(f"{prefix}.{name}") for name in names]


def _rebind(stack: contextlib.ExitStack, modules, original, replacement) -> None:
    """Patch every module-level name bound to ``original`` in ``modules`` (the kernel files and
    ops import their helpers by name) with ``replacement``, for the life of ``stack``."""
    for module in modules:
        for name, value in list(vars(module).items()):
            if value is original:
                stack.enter_context(mock.patch.object(module, name, replacement))


@contextlib.contextmanager
def recorded_launches(arch: int = 90, sm_count: int = H100_SMS):
    """Within this block no kernel launches: each launch appends a LaunchRecord to the yielded
    list, and on meta tensors the launchers and ops configure as on a CUDA sm_<arch> device with
    ``sm_count`` SMs (see the module's docstring)."""
    from fastsae.kernels import _common
    from fastsae.ops import _backend

    kernel_modules = [m for name, m in list(sys.modules.items()) if name.startswith("fastsae.kernels.")]
    kernel_modules += _loaded("fastsae.kernels", KERNEL_MODULES)
    op_modules = _loaded("fastsae.ops", OP_MODULES)
    launches: list[LaunchRecord] = []

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            raise RuntimeError("recorded_launches: a warmup inside the recording")
        launches.append(_launch_record(self, args, kwargs))

    real_arch, real_sm_count, real_use_triton = _common.gpu_arch, _common.sm_count, _backend.use_triton

    def gpu_arch(device):
        return arch if device.type == "meta" else real_arch(device)

    def sms(device):
        return sm_count if device.type == "meta" else real_sm_count(device)

    def use_triton(op, kernels, *tensors, **kwargs):
        if tensors and all(t.is_meta for t in tensors):  # as if on CUDA: the meta tensors stand for GPU ones
            with mock.patch.object(torch.Tensor, "is_cuda", property(lambda t: t.is_meta or t.device.type == "cuda")):
                return real_use_triton(op, kernels, *tensors, **kwargs)
        return real_use_triton(op, kernels, *tensors, **kwargs)

    with contextlib.ExitStack() as stack:
        for cls in _jit_classes():
            stack.enter_context(mock.patch.object(cls, "run", record))
        _rebind(stack, kernel_modules, real_arch, gpu_arch)
        _rebind(stack, kernel_modules, real_sm_count, sms)
        _rebind(stack, op_modules, real_use_triton, use_triton)
        yield launches


# --------------------------------------------------------------------------------------------
# A compile case: what a launch compiles, for compiling without a GPU

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8"}


class CompileCase:
    """One kernel launch as the launcher would make it, reduced to what triton.compile needs.

    ``args`` maps every runtime argument of the kernel to an example value: a torch.dtype stands
    for a tensor argument (a pointer; torch's allocations are 16-byte aligned, so the launch marks
    it 16-divisible), an int for an int argument, None for an optional pointer left out. The specialisation is the one a launch applies:
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
            if value is None:  # an optional pointer left out: a launch makes it a constant
                signature[name] = "constexpr"
                constexprs[name] = None
            elif isinstance(value, torch.dtype):
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


def record_runs(runs, arch: int, n_sms: int = H100_SMS) -> list[tuple[dict, LaunchRecord]]:
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


def _tensor_core(record) -> bool:
    return record.meta["MATMUL_MODE"] != "ieee"


# --------------------------------------------------------------------------------------------
# The cases of each op's kernels


def _kernels(name: str):
    return importlib.import_module(f"fastsae.kernels.{name}")


# Encoder shapes: the GPT-2 small preset (d_model 768, ratio 60, a 16 x 1,024-token batch) and a
# d = 4,096, 131,072-latent one.
ENCODER_SHAPES = {
    "gpt2": dict(n_tokens=16384, d_in=768, n_latents=46080),
    "d4096": dict(n_tokens=16384, d_in=4096, n_latents=131072),
}
TOPK_KS = (16, 32, 64, 128, 256)


def topk_encoder_cases(arch: int = 90, shapes: dict | None = None, ks=TOPK_KS) -> dict[str, CompileCase]:
    """Every kernel topk_encode_triton launches (forward and backward) on sm_<arch>.

    x [N, d] contiguous and W_enc latent-major (E2ESAE's layout, which fastsae.ops.topk_encode
    makes for any other); ks: the TopK k values (the forward's config depends on
    next_power_of_2(k)). Names: f"topk_fwd-{shape}-k{k}-{mode}", f"topk_gather-{shape}-{mode}",
    f"topk_segment-{shape}-{mode}". The forward and the segmented reduction carry the step's
    FLOPs: hot in the tensor-core modes."""
    tk, sc = _kernels("topk_encoder"), _kernels("_sparse_code")

    def run(shape, k):
        def step(dtype):
            x = meta_parameter(shape["n_tokens"], shape["d_in"], dtype=dtype)
            W_enc = meta_parameter(shape["d_in"], shape["n_latents"], dtype=dtype, transposed=True)
            values, _ = tk.topk_encode_triton(x, W_enc, meta_parameter(shape["n_latents"], dtype=dtype), k)
            values.backward(torch.empty_like(values))
        return step

    runs = [(dict(shape=name, k=k, mode=mode), mode, run(shape, k))
            for name, shape in (shapes or ENCODER_SHAPES).items() for mode in COMPILE_MODES for k in ks]
    short = {tk._topk_encode_fwd_kernel: "topk_fwd", sc.gather_latents_kernel: "topk_gather",
             sc.latent_segment_grad_kernel: "topk_segment"}

    def label(tags, record):
        k = f"-k{tags['k']}" if record.kernel is tk._topk_encode_fwd_kernel else ""
        return f"{short[record.kernel]}-{tags['shape']}{k}-{tags['mode']}"

    hot_kernels = (tk._topk_encode_fwd_kernel, sc.latent_segment_grad_kernel)
    return recorded_cases(record_runs(runs, arch), label, lambda r: r.kernel in hot_kernels and _tensor_core(r))


def relu_encoder_cases(arch: int = 90, shapes: dict | None = None) -> dict[str, CompileCase]:
    """Every kernel relu_encode_triton launches on sm_<arch>: forward and both backwards (sparse,
    and dense with sparse_backward=False).

    x contiguous, W_enc latent-major (fastsae.ops.relu_encode makes it for any other); the code's
    gradient dense, or expanded with stride 0 as autograd hands it for acts.sum()
    ("-expanded_grad"). Names: f"relu_{kernel}-{shape}-{mode}", one per specialisation (kernels
    without a dot compile once per dtype: their "ieee" launch is the "tf32" one). The encoder GEMM
    and the segmented reduction are hot in the tensor-core modes. The configs do not depend on
    the arch here."""
    re, sc = _kernels("relu_encoder"), _kernels("_sparse_code")

    def run(shape, sparse_backward, expanded_grad):
        def step(dtype):
            x = meta_parameter(shape["n_tokens"], shape["d_in"], dtype=dtype)
            W_enc = meta_parameter(shape["d_in"], shape["n_latents"], dtype=dtype, transposed=True)
            acts = re.relu_encode_triton(x, W_enc, meta_parameter(shape["n_latents"], dtype=dtype),
                                         sparse_backward=sparse_backward)
            # acts.sum() hands backward an expanded stride-0 gradient: the kernels read any strides
            (acts.sum() if expanded_grad else acts).backward(None if expanded_grad else torch.empty_like(acts))
        return step

    runs = [(dict(shape=name, mode=mode, grad="-expanded_grad" if expanded else ""), mode, run(shape, sparse, expanded))
            for name, shape in (shapes or ENCODER_SHAPES).items() for mode in COMPILE_MODES
            for sparse in (True, False) for expanded in (False, True)]
    short = {re._relu_encode_fwd_kernel: "relu_fwd", re._relu_grad_kernel: "relu_grad",
             sc.compact_active_kernel: "relu_compact", sc.gather_latents_kernel: "relu_gather",
             sc.latent_segment_grad_kernel: "relu_segment"}

    def label(tags, record):  # every backward kernel reads the code's gradient (the dense rows')
        grad = tags["grad"] if record.kernel is not re._relu_encode_fwd_kernel else ""
        return f"{short[record.kernel]}-{tags['shape']}-{tags['mode']}{grad}"

    hot_kernels = (re._relu_encode_fwd_kernel, sc.latent_segment_grad_kernel)
    return recorded_cases(record_runs(runs, arch), label, lambda r: r.kernel in hot_kernels and _tensor_core(r))


# The GPT-2 small preset (16 x 1,024 tokens, d 768, 46,080 latents, k 32) and a d = 4,096,
# 131,072-latent one.
DECODER_SHAPES = {
    "gpt2": dict(n_tokens=16384, d=768, n_latents=46080, k=32),
    "d4096": dict(n_tokens=16384, d=4096, n_latents=131072, k=64),
}


def sparse_decoder_cases(arch: int = 90, shapes: dict | None = None) -> dict[str, CompileCase]:
    """Every kernel sparse_decode_triton (forward and backward, with gradients for values and
    W_dec, W_dec only, values only) and dense_decode_triton (a ReLU code in the dense layout:
    compaction, gather, dense rows, grad_W_dec) launch on sm_<arch>.

    Names: f"{kernel}-{shape}-{mode}" (the gathers have no dot and compile once per dtype). Dense
    rows are the exception, not the hot path: no case here is hot. The configs do not depend on
    the arch."""
    sd, sc = _kernels("sparse_decoder"), _kernels("_sparse_code")

    def sparse_run(shape, need_values, need_W):
        def step(dtype):
            n_tokens, k = shape["n_tokens"], shape["k"]
            values = torch.empty(n_tokens, k, dtype=dtype, device="meta", requires_grad=need_values)
            indices = torch.empty(n_tokens, k, dtype=torch.int64, device="meta")
            W_dec = torch.empty(shape["n_latents"], shape["d"], dtype=dtype, device="meta", requires_grad=need_W)
            out = sd.sparse_decode_triton(values, indices, W_dec, meta_parameter(shape["d"], dtype=dtype))
            out.backward(torch.empty_like(out))
        return step

    def dense_run(shape):
        def step(dtype):
            acts = meta_parameter(shape["n_tokens"], shape["n_latents"], dtype=dtype)
            W_dec = meta_parameter(shape["n_latents"], shape["d"], dtype=dtype)
            out = sd.dense_decode_triton(acts, W_dec, meta_parameter(shape["d"], dtype=dtype))
            out.backward(torch.empty_like(out))
        return step

    runs = []
    for name, shape in (shapes or DECODER_SHAPES).items():
        for mode in COMPILE_MODES:
            runs += [(dict(shape=name, mode=mode, code="sparse"), mode, sparse_run(shape, need_values, need_W))
                     for need_values, need_W in ((True, True), (False, True), (True, False))]
            runs.append((dict(shape=name, mode=mode, code="dense"), mode, dense_run(shape)))

    def label(tags, record):
        kernel, meta = record.kernel, record.meta
        if kernel is sd._sparse_decode_bwd_kernel:
            variant = {(True, True): "bwd", (True, False): "bwd_grad_W_only",
                       (False, True): "bwd_grad_values_only"}[meta["WRITE_GRAD_W"], meta["WRITE_GRAD_VALUES"]]
            kernel_name = f"decode_{variant}"
        elif tags["code"] == "sparse":
            kernel_name = "decode_fwd"
        else:
            kernel_name = {sc.sparse_decode_fwd_kernel: "dense_decode_gather",
                           sc.compact_active_kernel: "dense_decode_compact",
                           sd._dense_rows_decode_kernel: "dense_rows_decode",
                           sc.latent_segment_grad_kernel: "dense_decode_grad_w"}[kernel]
        return f"{kernel_name}-{tags['shape']}-{tags['mode']}"

    return recorded_cases(record_runs(runs, arch), label, lambda record: False)


AUTOENCODER_WORKSPACE_ELEMENTS = 1 << 26  # fastsae.ops.relu_autoencoder's default budget
# The encoder shapes, and a transcoder's: GPT-2 small's MLP input (768) to its hidden layer (3,072),
# whose decoder width differs from the encoder's (d_out != d_in). Recorded after the others, so a
# launch that specialises as theirs keeps their case (recorded_cases): the transcoder adds a case
# only where d_out changes a kernel's specialisation.
AUTOENCODER_SHAPES = {**ENCODER_SHAPES,
                      "gpt2_mlp_transcoder": {"n_tokens": 16384, "d_in": 768, "d_out": 3072, "n_latents": 46080}}


def relu_autoencoder_cases(arch: int = 90, shapes: dict | None = None) -> dict[str, CompileCase]:
    """Every kernel relu_autoencode_triton launches (forward and backward) on sm_<arch>, with the
    layouts fastsae.ops.relu_autoencode makes (x contiguous, W_enc latent-major, W_dec row-major):
    ReLU, JumpReLU with a trained threshold and with a fixed one (BatchTopK's inference), p = 1 and
    p = 0.5, every chunk of the dense rows; SAEs and a transcoder (AUTOENCODER_SHAPES: "d_out" where
    the decoder's width differs from d_in). The kernels with a tensor-core dot are hot in the
    tensor-core modes. The configs do not depend on the arch."""
    ae, sc = _kernels("relu_autoencoder"), _kernels("_sparse_code")

    def run(shape, activation, p):
        def step(dtype):
            n_tokens, d, n = shape["n_tokens"], shape["d_in"], shape["n_latents"]
            d_out = shape.get("d_out", d)
            x = meta_parameter(n_tokens, d, dtype=dtype)
            W_enc = meta_parameter(d, n, dtype=dtype, transposed=True)
            theta = bandwidth = None
            if activation != "relu":
                theta = torch.empty(n, dtype=dtype, device="meta", requires_grad=activation == "jumprelu")
                bandwidth = 0.001 if activation == "jumprelu" else 0.0
            recon, lp_sum, l0, _ = ae.relu_autoencode_triton(
                x, W_enc, meta_parameter(n, dtype=dtype), meta_parameter(n, d_out, dtype=dtype),
                meta_parameter(d_out, dtype=dtype), theta, bandwidth, p, AUTOENCODER_WORKSPACE_ELEMENTS)
            loss = recon.sum() + lp_sum.sum() + (l0.sum() if activation == "jumprelu" else 0)
            loss.backward()
        return step

    runs = [(dict(shape=name, mode=mode), mode, run(shape, activation, p))
            for name, shape in (shapes or AUTOENCODER_SHAPES).items() for mode in COMPILE_MODES
            for activation in ("relu", "jumprelu", "fixed_threshold") for p in (1.0, 0.5)]

    def label(tags, record):
        kernel, meta = record.kernel, record.meta
        act = "jumprelu" if meta.get("JUMP") else "relu"
        p = "p1" if meta.get("P_ONE") else "px"
        if kernel is ae._dense_rows_matmul_kernel:
            where = {(True, True): "only", (True, False): "first", (False, False): "mid", (False, True): "last"}
            position = where[meta["FIRST"], meta["LAST"]]
            variant = f"decode_{position}-{p}" if meta["HAS_BIAS"] else f"grad_x_{position}"
        elif kernel is ae._latent_chunk_grad_kernel:
            variant = ("enc_jump" if meta["WRITE_THETA"] else "enc") if meta["WRITE_BIAS"] else "dec"
        else:
            variant = {ae._encode_compact_kernel: act, ae._dense_code_chunk_kernel: act,
                       ae._dense_grad_chunk_kernel: f"{act}-{p}"}.get(kernel)
        name = {ae._encode_compact_kernel: "ae_encode", ae._dense_code_chunk_kernel: "ae_dense_code",
                ae._dense_grad_chunk_kernel: "ae_dense_grad", ae._dense_rows_matmul_kernel: "ae_dense_matmul",
                ae._latent_chunk_grad_kernel: "ae_latent_grad", ae._sampled_dots_kernel: "ae_sampled_dots",
                sc.gather_latents_kernel: "ae_gather", sc.sparse_decode_fwd_kernel: "ae_decode"}[kernel]
        return "-".join(part for part in (name, variant, tags["shape"], tags["mode"]) if part)

    with_dot = (ae._encode_compact_kernel, ae._dense_code_chunk_kernel, ae._dense_grad_chunk_kernel,
                ae._dense_rows_matmul_kernel, ae._latent_chunk_grad_kernel)
    return recorded_cases(record_runs(runs, arch), label, lambda r: r.kernel in with_dot and _tensor_core(r))


# (name, d_model, d_vocab): the GPT-2 preset and a Llama-3-8B-sized model.
KL_SHAPES = (("gpt2", 768, 50257), ("d4096", 4096, 128256))
# Tokens per launch: the GPT-2 preset's step (16 x 1,024), an evaluation batch, and a step long
# enough for one vocabulary slice per row block in the two-pass gradient (no atomics).
TRAIN_TOKENS, EVAL_TOKENS, LONG_TOKENS = 16384, 1024, 32768


def _kl_scenarios(shape: str):
    """(kind, layout, n_tokens, has_mask, has_bias, capped) per launch to compile. What the trainer
    launches in full (tests/test_compile.py records a training step and an evaluation batch and
    checks that each of their launches is one of these): a step's one-sweep kernel and an
    evaluation batch's forward, unmasked, for both W_U layouts, with and without a bias, capped
    (Gemma-2) or not. The public op's other launches by example: a masked sweep and masked
    evaluation batches, and the reduction="none" gradient at short, long (no atomics) and masked N."""
    layouts = ("row", "col")
    found = [(kind, layout, TRAIN_TOKENS, False, bias, capped) for kind in ("sweep", "forward")
             for layout in layouts for bias in (True, False) for capped in (False, True)]
    found += [("sweep", layout, TRAIN_TOKENS, True, True, False) for layout in layouts]
    if shape == "gpt2":
        found += [("forward", layout, EVAL_TOKENS, True, True, False) for layout in layouts]
        grads = ((TRAIN_TOKENS, False), (LONG_TOKENS, False), (EVAL_TOKENS, True))
        found += [("grad", layout, n, mask, True, False) for layout in layouts for n, mask in grads]
    else:
        found += [("grad", layout, TRAIN_TOKENS, False, True, False) for layout in layouts]
    found.append(("grad", "row", TRAIN_TOKENS, False, True, True))
    return found


def linear_kl_cases(arch: int = 90, shapes=KL_SHAPES, sm_count: int = H100_SMS) -> dict[str, CompileCase]:
    """{key: CompileCase} for the launches of kernels/linear_kl.py on sm_<arch>, recorded from the
    launchers themselves run on meta tensors with the layouts real calls pass: h_orig and delta
    contiguous; W_U row-major after padded_unembedding ("row") or column-major as TransformerLens
    4 passes lm_head.weight.T ("col"); b_U fp32 (prepared_bias makes every bias fp32) or none; an
    int8 mask or none; int64 labels (the trainer always passes them). Block sizes come from
    kernel_config for the arch, the slice count from the launchers' rule for ``sm_count`` SMs,
    which decides USE_ATOMICS in the two-pass gradient.

    Keys: f"kl_{kind}-{shape}-{mode}-{layout}-N{n}" plus "-mask", "-nobias", "-softcap"; kind
    "forward" / "sweep" / "grad" (kernel_config), mode "bf16", "tf32" and "ieee". bf16 and tf32
    are hot: they must compile to tensor-core MMAs with pipelined loads and no spills.
    """
    cases = {}
    for name, d_model, d_vocab in shapes:
        for mode in COMPILE_MODES:
            with compile_mode(mode) as dtype:  # matmul_mode() reads the precision the trainer sets
                for kind, layout, n_tokens, has_mask, has_bias, capped in _kl_scenarios(name):
                    key = f"kl_{kind}-{name}-{mode}-{layout}-N{n_tokens}" + ("-mask" if has_mask else "") + \
                        ("" if has_bias else "-nobias") + ("-softcap" if capped else "")
                    cases[key] = _kl_case(kind, d_model, d_vocab, n_tokens, dtype, mode, layout, has_mask,
                                          has_bias, 30.0 if capped else None, arch, sm_count)
    return cases


def _kl_case(kind, d_model, d_vocab, n_tokens, dtype, mode, layout, has_mask, has_bias, softcap, arch,
             sm_count) -> CompileCase:
    """The CompileCase of one launch, recorded from its launcher on meta tensors."""
    kl = _kernels("linear_kl")
    meta_device = torch.device("meta")
    padded = -(-d_vocab // 16) * 16
    if layout == "row":  # padded_unembedding's buffer
        W_U = torch.empty(d_model, padded, dtype=dtype, device=meta_device)[:, :d_vocab]
        w_cols = padded
    else:
        W_U = torch.empty(d_vocab, d_model, dtype=dtype, device=meta_device).t()
        w_cols = d_vocab
    h = torch.empty(n_tokens, d_model, dtype=dtype, device=meta_device)
    b_U = torch.empty(d_vocab, dtype=torch.float32, device=meta_device) if has_bias else None
    mask = torch.empty(n_tokens, dtype=torch.int8, device=meta_device) if has_mask else None
    per_token = torch.empty(n_tokens, dtype=torch.float32, device=meta_device)
    with recorded_launches(arch, sm_count) as launches:
        if kind == "grad":
            kl.linear_kl_grad(h, h, W_U, b_U, mask, per_token, per_token, per_token, softcap, w_cols=w_cols)
        else:
            labels = torch.empty(n_tokens, dtype=torch.int64, device=meta_device)
            kl.linear_kl_forward(h, h, W_U, b_U, mask, labels, softcap,
                                 token_weight=per_token if kind == "sweep" else None, w_cols=w_cols)
    (record,) = launches
    return CompileCase.from_launch(record, hot=mode != "ieee")


# {kernel file (kernels/<name>.py): its cases(arch) -> {case name: CompileCase}}
CASES = {"topk_encoder": topk_encoder_cases, "relu_encoder": relu_encoder_cases,
         "sparse_decoder": sparse_decoder_cases, "relu_autoencoder": relu_autoencoder_cases,
         "linear_kl": linear_kl_cases}
assert tuple(CASES) == KERNEL_MODULES
