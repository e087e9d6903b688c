"""Every kernel launch fastsae ships compiles for sm_80 and sm_90 to its targets (no GPU needed).

The cases are tests/compile_cases.py's (every launch of each op's kernels, recorded on meta
tensors), compiled through Triton's launch path and read from the SASS by tests/compile_check.py. A case fails on a compile
error, shared memory over the arch's budget, or a register spill; a hot case also fails when it
loses wgmma or its pipelined loads on sm_90, or mma on sm_80. The facts themselves are written to
benchmarks/results/compile_sm{80,90}.json by ``python tests/compile_check.py --write``.

Time: cases whose case_key (kernel source with its callees, launch, arch, Triton version, SASS
reader) matches benchmarks/results/compile_sm{80,90}.json take the facts recorded there, so a
change compiles only what it touched; ``python tests/compile_check.py --write`` compiles every case
afresh and records them. Both archs compile side by side in two processes; Triton's cache (under
compile_check.CACHE_DIR) keeps a warm run to seconds, a cold full one takes about 10 minutes on two
cores.
"""

import contextlib
import functools
from unittest import mock

import pytest
import torch

from compile_cases import CompileCase, recorded_launches
from compile_check import (ARCHS, KERNEL_MODULES, MAX_SHARED_BYTES, RESULTS_DIR, collect_cases, problems,
                           run_compile_check, sass_facts)
from conftest import needs_triton

pytestmark = needs_triton


@pytest.fixture(scope="module")
def compile_results():
    # Cases unchanged since the committed results (same kernel source, launch, Triton, reader:
    # compile_check.case_key) take their recorded facts; every other case compiles here.
    return run_compile_check(reuse=RESULTS_DIR)


def _cases_of(report: dict, module: str) -> dict:
    return {name: r for name, r in report["cases"].items() if r["module"] == module}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_compile_to_their_targets(compile_results, module, arch):
    report = compile_results[arch]
    assert module not in report["module_errors"], report["module_errors"].get(module)
    cases = _cases_of(report, module)
    assert cases, f"kernels/{module}.py: tests/compile_cases.py records no case of its kernels"
    failures = {name: found for name, r in cases.items() if (found := problems(r, arch))}
    assert not failures, f"sm_{arch}:\n" + "\n".join(f"{name}: {'; '.join(found)}" for name, found in failures.items())


def _kernel_files() -> dict:
    """{module name: module} of every kernel file, the ops' and the shared ones (kernels/_*.py)."""
    import importlib
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "kernels"
    return {path.stem: importlib.import_module(f"fastsae.kernels.{path.stem}") for path in sorted(folder.glob("*.py"))}


def test_every_launched_kernel_has_a_compile_case(compile_results):
    """Each kernel a kernel file defines (by convention the @triton.jit functions named *_kernel),
    an op's or a shared one (kernels/_sparse_code.py), is compiled by some case, hot or not."""
    compiled = {r.get("kernel") for r in compile_results[90]["cases"].values()}
    defined = {}
    for name, module in _kernel_files().items():
        for attribute, value in vars(module).items():
            if attribute.endswith("_kernel") and hasattr(value, "arg_names") and value.fn.__module__ == module.__name__:
                defined[attribute] = name
    assert set(defined.values()) >= set(KERNEL_MODULES) | {"_sparse_code"}, defined
    missing = sorted(f"kernels/{module}.py: {kernel}" for kernel, module in defined.items() if kernel not in compiled)
    assert not missing, "kernels without a compile case:\n" + "\n".join(missing)


# ---------------------------------------------------------------------- what runs has a case

class _MetaLM:
    """What a training Objective reads of fastsae.model.LanguageModel, on meta tensors: one block's
    residual stream whose final hidden state is the SAE's output (the real model's later blocks
    run cuBLAS, not fastsae's kernels), and W_U / b_U / soft-capping as each TransformerLens API
    hands them over: HookedTransformer's W_U [d, V] row-major with b_U, the bridge's
    lm_head.weight.T (column-major) without one."""

    device = torch.device("meta")

    def __init__(self, d_model: int, d_vocab: int, *, api: str, softcap: float | None = None):
        self.d_model = d_model
        if api == "hooked":
            self.W_U, self.b_U = torch.empty(d_model, d_vocab, device="meta"), torch.empty(d_vocab, device="meta")
        else:
            self.W_U, self.b_U = torch.empty(d_vocab, d_model, device="meta").t(), None
        self.logit_softcap = softcap

    def block_index(self, hook: str) -> int:
        return int(hook.split(".")[1])

    def start_point(self, hook: str) -> str:
        return hook

    def _stream(self, tokens):
        return torch.empty(*tokens.shape, self.d_model, device="meta")

    def clean_run(self, tokens, cache_hooks=()):
        return self._stream(tokens), {hook: self._stream(tokens) for hook in cache_hooks}

    def spliced_run(self, tokens, replacements, *, start_hook=None, start_acts=None, capture_hooks=()):
        acts = self._stream(tokens) if start_acts is None else start_acts
        for replace in replacements.values():
            acts = replace(acts)
        return acts, {}


# (name, d_model, d_vocab, TransformerLens API, final-logit soft-capping): GPT-2 small on both APIs
# (the paper's model) and a Llama-3-8B-sized model on the bridge, plain and soft-capped as Gemma-2
# caps. The shapes are the compile check's (tests/compile_cases.py): an int argument's
# 16-divisibility is part of a specialisation, so another d or V (or a count derived from them,
# such as the vocabulary tiles per slice) may specialise differently.
TRAINING_MODELS = (("gpt2-hooked", 768, 50257, "hooked", None), ("gpt2-bridge", 768, 50257, "bridge", None),
                   ("llama-d4096", 4096, 128256, "bridge", None), ("capped-d4096", 4096, 128256, "bridge", 30.0))
# (SAE dtype, torch.set_float32_matmul_precision): the trainer's CUDA default (fp32 SAE, TF32), a
# bf16 SAE, and full fp32 by request.
TRAINING_PRECISIONS = (("float32", "high"), ("bfloat16", "high"), ("float32", "highest"))


def _recorded_training_launches(arch: int, model, activation: str, sae_dtype: str, precision: str) -> list:
    """The kernel launches of one training step (forward and backward) and one evaluation batch of
    the gpt2-e2e preset (16 x 1,024 tokens, ratio 60), recorded on meta tensors for sm_<arch>."""
    from fastsae.train import setup
    from fastsae.train.config import load_config
    from fastsae.train.metrics import DeadLatentTracker
    from fastsae.train.objective import Objective

    _, d_model, d_vocab, api, softcap = model
    overrides = [f"saes.activation={activation}", f"saes.dtype={sae_dtype}", "saes.hooks=[blocks.6.hook_resid_pre]"]
    if activation in ("topk", "batchtopk", "matryoshka_batchtopk"):
        overrides.append("saes.k=32")
    if activation == "matryoshka_batchtopk":  # 46,080 latents: prefixes of 1/32, 1/8 and 1/2 of them
        overrides.append("saes.params={widths: [1440, 5760, 23040]}")
    if activation == "jumprelu":
        overrides.append("saes.params={bandwidth: 0.001, init_threshold: 0.001}")
    cfg = load_config("gpt2-e2e", overrides)
    lm = _MetaLM(d_model, d_vocab, api=api, softcap=softcap)
    layout = setup.setup_layout(cfg)
    saes = setup.build_saes(cfg, cfg.saes.hooks, lm, layout, torch.device("meta"))
    trackers = {hook: DeadLatentTracker(sae.n_local, cfg.log.dead_window_tokens, lm.device) for hook, sae in saes.items()}
    objective = Objective(cfg, lm, saes, cfg.saes.hooks, layout, trackers)
    tokens = torch.empty(cfg.optim.batch_size, cfg.data.context_length, dtype=torch.long, device="meta")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        # AuxK lists the dead latents (nonzero): on meta tensors, taken as all of them.
        with recorded_launches(arch) as launches, _meta_values():
            loss, _, _ = objective(tokens, train=True)
            loss.backward()
            for sae in saes.values():
                sae.eval()
            with torch.no_grad():
                objective(tokens, train=False)
    finally:
        torch.set_float32_matmul_precision(previous)
    return launches


@functools.lru_cache(maxsize=None)
def _compiled_specialisations(arch: int) -> frozenset:
    """The specialisations the compile check compiles for sm_<arch> (recorded once per session)."""
    cases, errors = collect_cases(arch)
    assert not errors, errors
    return frozenset(case.specialisation() for case in cases.values())


@contextlib.contextmanager
def _meta_values():
    """What the step reads of tensor values, answered for meta tensors (they hold none): AuxK lists
    the dead latents (nonzero), taken as all of them; a data-dependent branch (bool of a tensor,
    BatchTopK's check for kept values past a shard's candidates) takes its common side, False."""
    import torch.fx.experimental._config as fx_config

    real_bool = torch.Tensor.__bool__

    def meta_bool(tensor):
        return False if tensor.is_meta else real_bool(tensor)

    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), mock.patch.object(torch.Tensor, "__bool__", meta_bool):
        yield


def _uncompiled(launches, compiled: set) -> list[str]:
    """The launches whose specialisation is not among ``compiled``, as readable lines."""
    cases = [CompileCase.from_launch(record, hot=False) for record in launches]
    return sorted({f"{case.kernel_name} {sorted(case.meta.items())} "
                   f"{sorted((k, v) for k, v in case.args.items() if isinstance(v, int))}"
                   for case in cases if case.specialisation() not in compiled})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"])
def test_every_training_launch_has_a_compile_case(arch, activation):
    """Every kernel launch a training step and an evaluation batch make (the real Objective, its
    SAEs and the fused KL, recorded on meta tensors: compile_cases.recorded_launches) is a
    specialisation the compile check compiles: no launch runs on a GPU that was never compiled
    and read here."""
    compiled = _compiled_specialisations(arch)
    missing = {}
    for model in TRAINING_MODELS:
        for sae_dtype, precision in TRAINING_PRECISIONS:
            launches = _recorded_training_launches(arch, model, activation, sae_dtype, precision)
            assert launches, "a training step launched no kernel: the recording did not reach the ops"
            for line in _uncompiled(launches, compiled):
                missing.setdefault(line, f"{model[0]}, SAE {sae_dtype}, precision {precision}")
    assert not missing, f"sm_{arch}: launches without a compile case:\n" + "\n".join(
        f"{line} ({where})" for line, where in missing.items())


@pytest.mark.parametrize("arch", ARCHS)
def test_auxk_launches_are_compiled_whatever_the_number_of_dead_latents(arch):
    """AuxK encodes with the dead latents only: their number changes every step, and so would the
    kernels' specialisation (a width of 1, or not divisible by 16) but for the padding in
    losses.auxk_loss. Every count from 1 on launches a compiled specialisation."""
    from fastsae import E2ESAE
    from fastsae.train import losses

    compiled = _compiled_specialisations(arch)
    sae = E2ESAE(768, 46080, activation="topk", k=32, device="meta")
    x = torch.empty(16384, 768, device="meta")
    recon = torch.empty(16384, 768, device="meta")
    for n_dead in (1, 2, 5, 16, 17, 100, 255, 256, 257, 1000):
        dead = torch.empty(n_dead, dtype=torch.bool, device="meta")  # nonzero() of it: all n_dead
        with recorded_launches(arch) as launches, _meta_values():
            losses.auxk_loss(sae, x, recon, dead).backward()
        assert launches
        assert not _uncompiled(launches, compiled), (n_dead, _uncompiled(launches, compiled))


@pytest.mark.parametrize("W_enc_layout", ["latent_major", "row_major"])
def test_public_ops_launch_compiled_kernels_for_any_layout(W_enc_layout):
    """The public encoder ops take W_enc [d_in, n] in either storage order and x as any view: what
    they launch is a compiled specialisation (they make the layout the kernels read, once: the
    latent-major W_enc that keeps the backward's gathers vectorised, a contiguous x)."""
    from fastsae import ops

    compiled = _compiled_specialisations(90)
    n_tokens, d, n = 16384, 768, 46080

    def param(*shape, transposed=False):
        t = torch.empty(*(reversed(shape) if transposed else shape), device="meta")
        return (t.t() if transposed else t).requires_grad_()

    W_enc = param(d, n, transposed=W_enc_layout == "latent_major")
    x = torch.empty(n_tokens, 2 * d, device="meta")[:, ::2].requires_grad_()  # a strided view
    b_enc, W_dec, b_dec = param(n), param(n, d), param(d)
    with recorded_launches(90) as launches:
        values, _ = ops.topk_encode(x, W_enc, b_enc, 32)
        values.sum().backward()
        ops.relu_encode(x, W_enc, b_enc).sum().backward()
        ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec).reconstruction.sum().backward()
    assert launches and not _uncompiled(launches, compiled), _uncompiled(launches, compiled)


@pytest.mark.parametrize("d_in, d_out", [(768, 3072), (3072, 768)], ids=["mlp_in_to_hidden", "hidden_to_mlp_out"])
def test_transcoder_launches_are_compiled(d_in, d_out):
    """A transcoder through the public op (the decoder's width d_out != d_in, both ways; ReLU and
    JumpReLU; bf16, and fp32 under TF32): every launch is a compiled specialisation. The compile
    cases record one transcoder shape (compile_cases.AUTOENCODER_SHAPES); the other direction
    swaps which width each kernel's d and strides come from."""
    from compile_cases import compile_mode

    from fastsae import ops

    compiled = _compiled_specialisations(90)
    n_tokens, n = 16384, 46080
    for mode in ("bf16", "tf32"):
        for jump in (False, True):
            with compile_mode(mode) as dtype, recorded_launches(90) as launches:
                def param(*shape):
                    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)

                W_enc = torch.empty(n, d_in, dtype=dtype, device="meta").t().requires_grad_()
                theta = param(n) if jump else None
                out = ops.relu_autoencode(param(n_tokens, d_in), W_enc, param(n), param(n, d_out), param(d_out),
                                          threshold=theta, bandwidth=0.001 if jump else None)
                assert out.reconstruction.shape == (n_tokens, d_out)
                (out.reconstruction.sum() + out.lp_sum.sum() + (out.l0.sum() if jump else 0)).backward()
            assert launches and not _uncompiled(launches, compiled), (mode, jump, _uncompiled(launches, compiled))


def test_a_launch_outside_the_cases_is_caught():
    """The check above can fail: a launch the cases do not cover (the sparse decoder's forward at
    an odd width, whose d is no longer 16-divisible) is not among the compiled specialisations."""
    from fastsae.kernels.sparse_decoder import sparse_decode_triton

    compiled = _compiled_specialisations(90)
    with recorded_launches(90) as launches:
        sparse_decode_triton(torch.empty(16384, 32, device="meta"), torch.empty(16384, 32, dtype=torch.long, device="meta"),
                             torch.empty(46080, 770, device="meta"), torch.empty(770, device="meta"))
    (record,) = launches
    assert CompileCase.from_launch(record, hot=False).specialisation() not in compiled
    record.args["d"], record.args["stride_w"], record.args["stride_out"] = 768, 768, 768
    assert CompileCase.from_launch(record, hot=False).specialisation() in compiled


@pytest.mark.parametrize("arch", ARCHS)
def test_topk_forward_programs_per_sm_fit_by_the_compile_facts(compile_results, arch):
    """The TopK forward's configs declare how many programs run side by side on one SM (two at
    K_PAD <= 64 on sm_90: selection in one overlaps the other's MMAs); default_splits sizes a wave
    by it. The registers (allocated 8 per thread) and shared memory each case compiled to must
    allow that many."""
    from fastsae.kernels import topk_encoder

    checked = 0
    for name, r in compile_results[arch]["cases"].items():
        if r.get("kernel") != "_topk_encode_fwd_kernel":
            continue
        mode = name.rsplit("-", 1)[1]
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        declared = topk_encoder.fwd_config(r["meta"]["K_PAD"], dtype, torch.device("meta"), arch=arch,
                                           mode=mode)["programs_per_sm"]
        registers = -(-r["registers"] // 8) * 8 * 32 * r["num_warps"]
        by_registers = 65536 // registers
        by_shared = (MAX_SHARED_BYTES[arch] + 1024) // (r["shared_bytes"] + 1024)  # 1 KiB reserved per block
        assert declared <= min(by_registers, by_shared), (
            f"sm_{arch} {name}: declares {declared} programs per SM, the facts allow {by_registers} by registers "
            f"({r['registers']} x {32 * r['num_warps']} threads), {by_shared} by shared memory")
        checked += 1
    assert checked


# ---------------------------------------------------------------------- the SASS reader, on known text

SASS = """
        /*0100*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR8][R4.64] ;
        /*0110*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR8][R6.64] ;
        /*0120*/              @!P0 LDG.E.64 R8, desc[UR8][R10.64] ;
        /*0130*/                   LDG.E.U16 R9, desc[UR8][R12.64] ;
        /*0140*/                   LDG.E R11, desc[UR8][R14.64] ;
        /*0150*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0160*/                   STL [R1+0x10], R24 ;
        /*0170*/                   LDL R24, [R1+0x10] ;
        /*0180*/                   LDL.64 R26, [R1+0x18] ;
        /*0190*/                   MEMBAR.ALL.GPU ;
        /*01a0*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR8][R2.64], R0 ;
        /*01b0*/                   FFMA R0, R1, R2, R3 ;
"""
RES_USAGE = "Function kern:\n\tREG:168 STACK:24 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0"


def test_sass_facts_reads_spills_mma_pipelining_and_load_widths():
    facts = sass_facts(SASS, RES_USAGE)
    assert facts["registers"] == 168 and facts["stack_bytes"] == 24
    assert (facts["spill_stores"], facts["spill_loads"]) == (1, 2)  # LOCAL:0 notwithstanding
    assert facts["mma_kind"] == "wgmma" and facts["wgmma"] == 1 and facts["ffma"] == 1
    assert facts["cp_async"] == 2 and facts["tma_loads"] == 0
    # LTC128B is a cache hint, not the width: the copies are 128-bit
    assert facts["global_loads"] == {"LDG.16": 1, "LDG.32": 1, "LDG.64": 1, "LDGSTS.128": 2}
    assert facts["vector_load_share"] == 0.6
    assert facts["membars"] == facts["gpu_membars"] == 1 and facts["atomics"] == 1


def test_sass_facts_of_a_cuda_core_kernel():
    facts = sass_facts("        /*0000*/                   FFMA R0, R1, R2, R3 ;\n"
                       "        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n",
                       "REG:40 STACK:0 SHARED:0 LOCAL:0")
    assert facts["mma_kind"] == "mma" and facts["spill_stores"] == facts["spill_loads"] == facts["stack_bytes"] == 0
    fma_only = sass_facts("        /*0000*/                   FFMA R0, R1, R2, R3 ;\n", "REG:40 STACK:0")
    assert fma_only["mma_kind"] == "fma"


def _facts(**overrides):
    facts = dict(shared_bytes=98304, stack_bytes=0, spill_stores=0, spill_loads=0, source_matches_launch=True,
                 hot=True, has_dot=True, mma_kind="wgmma", cp_async=24, tma_loads=0, atomics=0, gpu_membars=0)
    return dict(facts, **overrides)


def test_problems_fail_spills_overflow_and_hot_configs_off_the_tensor_cores():
    assert problems(_facts(), 90) == [] and problems(_facts(mma_kind="mma", cp_async=0), 80) == []
    assert problems(_facts(hot=False, mma_kind="fma", cp_async=0), 90) == []
    assert "spills" in problems(_facts(stack_bytes=8), 90)[0]
    assert "spills" in problems(_facts(spill_loads=1), 80)[0]
    assert "shared memory" in problems(_facts(shared_bytes=MAX_SHARED_BYTES[80] + 1), 80)[0]
    assert "not wgmma" in problems(_facts(mma_kind="mma"), 90)[0]
    assert "not mma" in problems(_facts(mma_kind="fma"), 80)[0]
    assert "pipelined" in problems(_facts(cp_async=0), 90)[0]
    assert problems(_facts(cp_async=0, tma_loads=4), 90) == []
    assert "acq_rel" in problems(_facts(atomics=2, gpu_membars=2), 90)[0]
    assert problems(_facts(atomics=2, gpu_membars=0), 90) == []
    assert "differs from the launch" in problems(_facts(source_matches_launch="attrs: ..."), 90)[0]
    assert problems(dict(error="CompilationError: ..."), 90) == ["does not compile: CompilationError: ..."]


def test_recorded_facts_are_reused_only_for_unchanged_cases(tmp_path):
    """A recorded case stands in for a compile only under its own case_key: with one case's key
    altered in the record, that case compiles afresh (its real facts come back) while the others
    keep the record's (here marked, so the test sees which were taken)."""
    import json

    record = json.loads((RESULTS_DIR / "compile_sm90.json").read_text())
    target = next(name for name, r in record["cases"].items() if not r.get("same_kernel_as") and not r["hot"])
    for r in record["cases"].values():
        r["registers"] = -1  # the marker: no compiled kernel has -1 registers
    record["keys"][target] = "changed"
    (tmp_path / "compile_sm90.json").write_text(json.dumps(record))
    report = run_compile_check(archs=(90,), reuse=tmp_path)[90]
    assert report["cases"][target]["registers"] > 0  # compiled
    others = [r for name, r in report["cases"].items() if name != target]
    assert others and all(r["registers"] == -1 for r in others)  # taken from the record
    assert report["reused"] == len(report["keys"]) - 1
