"""Compile every shipped kernel launch for sm_80 / sm_90 with no GPU present, and read the SASS.

Triton's interpreter runs kernels on CPU but cannot see what only the GPU compiler decides: whether
a tl.dot becomes wgmma (sm_90) / mma (sm_80) or CUDA-core FMAs, whether global loads are pipelined
(cp.async / TMA) and vectorised, register spills, shared memory. This module compiles what a launch
compiles and reads those facts from the cubin with the cuobjdump in Triton's wheel.

What is compiled
----------------
tests/compile_cases.py: for each kernel file in KERNEL_MODULES (kernels/<name>.py, installed as
fastsae.kernels.<name>), a function cases(arch) -> {name: CompileCase}, one CompileCase per
specialisation its launchers launch on CUDA, keyed by a name unique in the module that says the
kernel, the shape, the variant and the operand mode (e.g. "topk_fwd-gpt2-k32-tf32"). The cases
are recorded, not listed: the op's autograd functions run (forward and backward) on meta tensors
under compile_cases.recorded_launches(arch), which wraps the launchers from outside so that they
configure as on a CUDA sm_<arch> GPU and hand each launch (kernel, arguments, constexprs,
num_warps, num_stages) to the record instead of launching; recorded_cases() keeps one case per
specialisation and marks ``hot`` the configs that carry the step's FLOPs. Cases that specialise
to the same kernel compile once (Triton's own kernel cache) and are reported under the first name
(``same_kernel_as`` lists the others). tests/test_compile.py records a training step and an
evaluation batch (the real Objective, its SAEs and the fused KL) the same way and fails on any
launch that is not one of these specialisations.

How a case is compiled
----------------------
Through the launch path itself: ``JITFunction.warmup`` with the case's arguments (tensors as
triton's MockTensor, whose address is 0: 16-byte aligned like every torch allocation), under a
stand-in driver whose current target is GPUTarget("cuda", arch, 32). So Triton's own binder applies
its own specialisation (ints equal to 1 become constants, 16-divisible ints and aligned pointers get
``tt.divisibility = 16``) and its own option parsing; nothing is re-implemented here.
``CompileCase.source()`` (the same specialisation written out for triton.compile) is compared with
what the binder produced, per case (``source_matches_launch`` in the report).

What is read (per case and arch; benchmarks/results/compile_sm<arch>.json)
-------------------------------------------------------------------------
registers and STACK from ``cuobjdump -res-usage`` (its LOCAL field stays 0 when a kernel spills),
spill stores / loads as STL / LDL instructions in ``cuobjdump -sass``, shared memory from the
compiled metadata, the MMA kind (``wgmma`` = HGMMA, ``mma`` = HMMA, ``fma`` where the kernel has a
tl.dot but no tensor-core instruction), pipelined global loads (LDGSTS = cp.async, UTMALDG = TMA),
global-load widths (and the share of 128 / 64-bit vector loads), MEMBAR (all, and GPU-scope) and
atomic (RED / ATOM) counts. ``problems()`` turns the facts into failures: a compile error, shared
memory over the arch's budget, any spill, atomics with GPU-scope barriers (acq_rel); for a hot
case, sm_90 without wgmma or without pipelined loads, sm_80 without mma.

Running it
----------
The interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA) replaces
triton.language in the test process, so compiling happens in fresh processes with
TRITON_INTERPRET=0, one per arch side by side: ``run_compile_check()``. Compiled kernels are cached
by Triton (keyed by kernel source, specialisation, options and target) and SASS facts by the hash
of the cubin and of the reader, under CACHE_DIR: a cold run compiles everything, a warm one only
what changed.

    python tests/compile_check.py                  # print the table for sm_80 and sm_90
    python tests/compile_check.py --write          # ... and write benchmarks/results/compile_sm*.json
    python tests/compile_check.py --write --reuse  # ... compiling only the cases whose case_key changed

``--reuse [DIR]`` takes the recorded facts of every case whose case_key equals the one in
DIR/compile_sm<arch>.json (default: the committed results) and compiles the rest; with ``--write``
the written reports hold both (after a change to one kernel file, only its cases compile). Without
``--reuse``, ``--write`` compiles everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90)
# Shared memory one block may use (bytes): A100 (sm_80) 163 KiB, H100 / H200 (sm_90) 227 KiB.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
from compile_cases import KERNEL_MODULES  # noqa: E402 - beside this file (tests/)
FLOAT32_MATMUL_PRECISION = "high"

CACHE_DIR = Path(os.environ.get("FASTSAE_COMPILE_CACHE", Path(tempfile.gettempdir()) / "fastsae-compile-check"))
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
_MARKER = "COMPILE_CHECK_JSON"


# ------------------------------------------------------------------------------ collecting cases

def collect_cases(arch: int) -> tuple[dict, dict[str, str]]:
    """({"<module>/<case>": CompileCase}, {module: error}) over KERNEL_MODULES for sm_<arch>.

    A module whose kernels fail to import or whose cases raise is reported in the second dict (the
    tests fail on it) rather than hiding the other modules' cases.
    """
    import torch

    from compile_cases import CASES

    cases, errors = {}, {}
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(FLOAT32_MATMUL_PRECISION)
    try:
        for module_name in KERNEL_MODULES:
            try:
                for case_name, case in CASES[module_name](arch=arch).items():
                    cases[f"{module_name}/{case_name}"] = case
            except Exception as e:  # noqa: BLE001 - reported per module, see docstring
                errors[module_name] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_float32_matmul_precision(previous)
    return cases, errors


# ------------------------------------------------------------------------------ compiling (worker)

class _CompileOnlyDriver:
    """Stands in for triton's active driver: a launch path that only compiles needs the current
    target, device and stream, nothing that touches a GPU (warmup never loads or launches)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _jit_function(kernel):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise TypeError(f"CompileCase.kernel must be a @triton.jit kernel, got {kernel!r}")
    return kernel


def _launch_kwargs(case) -> dict:
    """The case's arguments as a launch passes them (tensors as MockTensor, 16-byte aligned)."""
    import torch
    from triton.runtime.jit import MockTensor

    args = {name: MockTensor(value) if isinstance(value, torch.dtype) else value for name, value in case.args.items()}
    return dict(args, **case.meta, num_warps=case.num_warps, num_stages=case.num_stages)


def launch_specialisation(compiled, fn) -> tuple[dict, dict, dict]:
    """(signature, constexprs by argument name, non-empty attrs) of a kernel compiled by a launch:
    what Triton's binder made of the arguments, read back from the compiled kernel's source."""
    src = compiled.src
    constexprs = {fn.arg_names[path[0]]: value for path, value in src.constants.items()}
    attrs = {path: value for path, value in src.attrs.items() if value}
    return dict(src.signature), constexprs, attrs


def source_matches_launch(case, compiled) -> bool | str:
    """True where CompileCase.signature_and_specialisation() equals the launch's, else the difference."""
    launch = launch_specialisation(compiled, _jit_function(case.kernel))
    try:
        signature, constexprs, attrs = case.signature_and_specialisation()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    ours = (signature, constexprs, {path: value for path, value in attrs.items() if value})
    if ours == launch:
        return True
    labels = ("signature", "constexprs", "attrs")
    return "; ".join(f"{label}: CompileCase {a} != launch {b}" for label, a, b in zip(labels, ours, launch) if a != b)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _global_load_width(opcode: str) -> str:
    """"128" / "64" / "32" / "16" / "8": the access width of an LDG / LDGSTS opcode
    (LDG.E.128, LDG.E.64.CONSTANT, LDG.E.U16, LDG.E (32-bit); LDGSTS.E.BYPASS.LTC128B.128)."""
    parts = opcode.split(".")[1:]
    for width in ("128", "64"):
        if width in parts:
            return width
    for part in parts:
        if part in ("U16", "S16"):
            return "16"
        if part in ("U8", "S8"):
            return "8"
    return "32"


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)", re.M)


def sass_facts(sass: str, res_usage: str) -> dict:
    """Facts about one kernel from its ``cuobjdump -sass`` and ``-res-usage`` text."""
    opcodes = _OPCODE.findall(sass)
    base = [op.split(".", 1)[0] for op in opcodes]

    def count(*names):
        return sum(b in names for b in base)

    load_widths: dict[str, int] = {}
    for op, b in zip(opcodes, base):
        if b in ("LDG", "LDGSTS"):
            width = _global_load_width(op)
            load_widths[f"{b}.{width}"] = load_widths.get(f"{b}.{width}", 0) + 1
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res_usage)}
    wgmma, hmma, ffma = count("HGMMA"), count("HMMA"), count("FFMA")
    return dict(
        registers=usage.get("REG"), stack_bytes=usage.get("STACK"),
        spill_stores=count("STL"), spill_loads=count("LDL"),
        wgmma=wgmma, hmma=hmma, ffma=ffma,
        mma_kind="wgmma" if wgmma else "mma" if hmma else "fma",
        cp_async=count("LDGSTS"), tma_loads=count("UTMALDG"),
        global_loads=dict(sorted(load_widths.items())),
        # Share of global-load instructions moving 64 or 128 bits (bias / index loads may stay narrow).
        vector_load_share=round(sum(n for key, n in load_widths.items() if key.endswith((".128", ".64")))
                                / max(1, sum(load_widths.values())), 3),
        # A GPU- or system-scope barrier is what an acq_rel atomic costs (tl.atomic_* default);
        # CTA-scope ones come with shared-memory / async-copy synchronisation.
        membars=count("MEMBAR"), gpu_membars=sum(b == "MEMBAR" and (".GPU" in op or ".SYS" in op)
                                                 for op, b in zip(opcodes, base)),
        atomics=count("RED", "REDG", "ATOM", "ATOMG"),
    )


def cubin_facts(cubin: bytes) -> dict:
    """sass_facts of a cubin (cuobjdump from triton's wheel), cached by the hash of the cubin and
    of the reader's own code (a change to what is read invalidates the cache)."""
    import inspect

    reader = "".join(inspect.getsource(f) for f in (sass_facts, _global_load_width)) + _OPCODE.pattern
    digest = hashlib.sha256(cubin + reader.encode()).hexdigest()
    cached = CACHE_DIR / "sass" / f"{digest}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)

        def cuobjdump(flag):
            run = subprocess.run([_tool("cuobjdump"), flag, path], capture_output=True, text=True, check=True)
            return run.stdout

        facts = sass_facts(cuobjdump("-sass"), cuobjdump("-res-usage"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(facts))
    tmp_path.replace(cached)  # atomic: a concurrent run reads a whole file or none
    return facts


def _jsonable(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def case_key(case, arch: int) -> str:
    """A digest of everything that decides what a case compiles to and what is read from it: the
    kernel's source with every jit function it calls (Triton's own cache key, which also holds the
    line it starts on), the launch's arguments, constexprs and options, the arch, Triton's version,
    the matmul precision and the SASS reader's code."""
    import inspect

    import triton

    launch = {name: str(value) if not isinstance(value, (int, float, str, bool, type(None))) else value
              for name, value in {**case.args, **case.meta}.items()}
    reader = "".join(inspect.getsource(f) for f in (sass_facts, _global_load_width)) + _OPCODE.pattern
    text = json.dumps([_jit_function(case.kernel).cache_key, launch, case.num_warps, case.num_stages, arch,
                       triton.__version__, FLOAT32_MATMUL_PRECISION, reader], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def compile_for_arch(arch: int, known: dict | None = None) -> dict:
    """Compile every collected case for sm_<arch> (in a process without the interpreter); the
    report {"cases": {name: facts}, "keys": {name: case_key}, "module_errors": {...}, ...} that
    compile_sm<arch>.json holds.

    known: an earlier report (the committed compile_sm<arch>.json). A case whose case_key equals
    the one recorded there takes its recorded facts instead of compiling again (counted in
    "reused"): what decides the compiled kernel is the same, so the facts are too. Any change to
    a kernel, a launch config, Triton or the reader compiles that case afresh."""
    import triton
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_for_arch needs TRITON_INTERPRET=0 (the interpreter replaces triton.language)")
    driver.set_active(_CompileOnlyDriver(arch))
    cases, module_errors = collect_cases(arch)
    known_keys = (known or {}).get("keys", {})
    known_cases = (known or {}).get("cases", {})
    first_of_alias = {alias: first for first, r in known_cases.items() for alias in r.get("same_kernel_as", ())}
    reports, first_name_of, keys, reused = {}, {}, {}, 0
    for name, case in cases.items():
        try:
            keys[name] = case_key(case, arch)
        except Exception as e:  # noqa: BLE001 - a case that cannot even be keyed is compiled (and fails) below
            keys[name] = f"unkeyed: {type(e).__name__}"
        if known_keys.get(name) == keys[name]:
            if name in known_cases and "error" not in known_cases[name]:
                reports[name] = {k: v for k, v in known_cases[name].items() if k != "same_kernel_as"}
                reused += 1
                continue
            first = first_of_alias.get(name)
            if first in reports and known_keys.get(first) == keys.get(first):
                reports[first].setdefault("same_kernel_as", []).append(name)
                reused += 1
                continue
        report = dict(module=name.split("/", 1)[0], hot=bool(case.hot), num_warps=case.num_warps,
                      num_stages=case.num_stages, meta={k: _jsonable(v) for k, v in case.meta.items()})
        try:
            fn = _jit_function(case.kernel)
            report["kernel"] = fn.__name__
            compiled = fn.warmup(grid=(1,), **_launch_kwargs(case))
            report["source_matches_launch"] = source_matches_launch(case, compiled)
        except Exception as e:  # noqa: BLE001 - a compile error is this case's result
            reports[name] = dict(report, error=f"{type(e).__name__}: {e}"[:4000])
            continue
        if id(compiled) in first_name_of:  # same specialisation as an earlier case: one kernel
            reports[first_name_of[id(compiled)]].setdefault("same_kernel_as", []).append(name)
            continue
        first_name_of[id(compiled)] = name
        report.update(shared_bytes=int(compiled.metadata.shared), max_shared_bytes=MAX_SHARED_BYTES[arch],
                      has_dot="tt.dot" in compiled.asm["ttir"], **cubin_facts(compiled.asm["cubin"]))
        reports[name] = report
    return dict(triton=triton.__version__, arch=f"sm_{arch}", float32_matmul_precision=FLOAT32_MATMUL_PRECISION,
                module_errors=module_errors, cases=reports, keys=keys, reused=reused)


# ------------------------------------------------------------------------------ judging

def problems(report: dict, arch: int) -> list[str]:
    """What is wrong with one case's facts for sm_<arch> (empty: it passes)."""
    if "error" in report:
        return [f"does not compile: {report['error']}"]
    found = []
    if report["shared_bytes"] > MAX_SHARED_BYTES[arch]:
        found.append(f"shared memory {report['shared_bytes']} B > {MAX_SHARED_BYTES[arch]} B")
    if report["spill_stores"] or report["spill_loads"] or report["stack_bytes"]:
        found.append(f"spills: STACK {report['stack_bytes']} B, {report['spill_stores']} STL, "
                     f"{report['spill_loads']} LDL")
    if report["atomics"] and report["gpu_membars"]:
        found.append(f"acq_rel atomics: {report['gpu_membars']} GPU-scope MEMBARs beside {report['atomics']} "
                     "atomics (sem='relaxed' needs none)")
    if report["source_matches_launch"] is not True:
        found.append(f"CompileCase.source() differs from the launch: {report['source_matches_launch']}")
    if report["hot"]:
        wanted = "wgmma" if arch >= 90 else "mma"
        if report["mma_kind"] != wanted:
            found.append(f"hot config compiles to {report['mma_kind']}, not {wanted}")
        if arch >= 90 and not (report["cp_async"] or report["tma_loads"]):
            found.append("hot config has no pipelined global loads (no LDGSTS / UTMALDG)")
    return found


def format_table(report: dict) -> str:
    """One line per case: the facts a reader compares across configs."""
    lines = [f"{report['arch']} (triton {report['triton']}, fp32 matmul precision "
             f"{report['float32_matmul_precision']})",
             f"{'case':60} {'hot':3} {'regs':>4} {'stack':>5} {'STL/LDL':>7} {'smem':>7} {'mma':5} "
             f"{'pipe':4} {'vec':>4} {'membar':>6}"]
    for name, r in report["cases"].items():
        if "error" in r:
            lines.append(f"{name:60} ERROR {r['error'][:200]}")
            continue
        pipe = "tma" if r["tma_loads"] else "cp" if r["cp_async"] else "-"
        mma = r["mma_kind"] if r["has_dot"] else "-"
        lines.append(f"{name:60} {'hot' if r['hot'] else '':3} {r['registers']:>4} {r['stack_bytes']:>5} "
                     f"{r['spill_stores']:>3}/{r['spill_loads']:<3} {r['shared_bytes']:>7} {mma:5} {pipe:4} "
                     f"{r['vector_load_share']:>4.0%} {r['membars']:>6}")
    for module, error in report["module_errors"].items():
        lines.append(f"{module}: {error}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ driving (parent)

def run_compile_check(archs=ARCHS, timeout: float = 1800, reuse: Path | None = None) -> dict[int, dict]:
    """{arch: compile_for_arch(arch)} from fresh processes (TRITON_INTERPRET=0), one per arch, side
    by side; Triton's cache goes under CACHE_DIR unless TRITON_CACHE_DIR is set. reuse: a directory
    of earlier compile_sm<arch>.json reports whose unchanged cases are taken as they are."""
    env = dict(os.environ, TRITON_INTERPRET="0")  # "0" is off; conftest only sets it when unset
    env.setdefault("TRITON_CACHE_DIR", str(CACHE_DIR / "triton"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    reuse_args = ["--reuse", str(reuse)] if reuse is not None else []
    runs = {arch: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(arch), *reuse_args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for arch in archs}
    results = {}
    try:
        for arch, run in runs.items():
            out, err = run.communicate(timeout=timeout)
            if run.returncode != 0 or _MARKER not in out:
                raise RuntimeError(f"the compile check for sm_{arch} failed:\n{err[-4000:]}")
            results[arch] = json.loads(out.split(_MARKER, 1)[1])
    finally:
        for run in runs.values():  # the other arch's process, where one failed or timed out
            if run.poll() is None:
                run.kill()
                run.wait()
    return results


def write_results(results: dict[int, dict], directory: Path = RESULTS_DIR) -> list[Path]:
    """benchmarks/results/compile_sm<arch>.json per arch."""
    paths = []
    for arch, report in results.items():
        path = Path(directory) / f"compile_sm{arch}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compile for this arch only (repeatable; default: all)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/compile_sm<arch>.json")
    parser.add_argument("--reuse", type=Path, nargs="?", const=RESULTS_DIR, metavar="DIR",
                        help="take unchanged cases from DIR/compile_sm<arch>.json (default DIR: the committed "
                             "results) instead of compiling them; with --write, the written reports hold the reused "
                             "and the compiled cases")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: one arch, JSON on stdout
    args = parser.parse_args(argv)
    if args.worker is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        known = None
        if args.reuse is not None and (args.reuse / f"compile_sm{args.worker}.json").is_file():
            known = json.loads((args.reuse / f"compile_sm{args.worker}.json").read_text())
        print(_MARKER + json.dumps(compile_for_arch(args.worker, known)))
        return 0
    start = time.perf_counter()
    results = run_compile_check(tuple(args.arch or ARCHS), reuse=args.reuse)
    failed = 0
    for arch, report in results.items():
        print(format_table(report))
        for name, r in report["cases"].items():
            for problem in problems(r, arch):
                failed += 1
                print(f"FAIL sm_{arch} {name}: {problem}")
        failed += len(report["module_errors"])
    if args.write:
        for path in write_results(results):
            print(f"wrote {path}")
    print(f"{time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
