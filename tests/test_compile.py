"""Every kernel launch fastsae ships compiles for sm_80 and sm_90 to its targets (no GPU needed).

The cases are the kernel modules' own (``compile_cases()`` in kernels/<op>.py), compiled through
Triton's launch path and read from the SASS by tests/compile_check.py. A case fails on a compile
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

import pytest

from compile_check import (ARCHS, KERNEL_MODULES, MAX_SHARED_BYTES, RESULTS_DIR, problems, run_compile_check,
                           sass_facts)
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
    assert cases, f"kernels/{module}.py: compile_cases() returned no cases"
    failures = {name: found for name, r in cases.items() if (found := problems(r, arch))}
    assert not failures, f"sm_{arch}:\n" + "\n".join(f"{name}: {'; '.join(found)}" for name, found in failures.items())


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_every_launched_kernel_has_a_compile_case(compile_results, module):
    """Each kernel a module launches (by convention the @triton.jit functions named *_kernel) is
    in its compile_cases(), hot or not."""
    import importlib

    kernels_module = importlib.import_module(f"fastsae.kernels.{module}")
    defined = {name for name, value in vars(kernels_module).items()
               if name.endswith("_kernel") and hasattr(value, "arg_names")}
    # a case that compiles to another module's kernel is reported under that case's name
    compiled = {r.get("kernel") for r in compile_results[90]["cases"].values()
                if r["module"] == module or any(name.startswith(module + "/") for name in r.get("same_kernel_as", ()))}
    assert defined, f"kernels/{module}.py defines no *_kernel jit function"
    assert defined <= compiled, f"kernels/{module}.py: no compile case for {sorted(defined - compiled)}"


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
