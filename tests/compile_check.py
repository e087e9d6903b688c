"""Compile a Triton kernel for sm_80 / sm_90 with no GPU present, and report its resources.

Triton's interpreter runs kernels on CPU but cannot see what only the GPU compiler catches:
unsupported tl.dot shapes, layout errors, shared-memory overflow, register spills. Compiling
through ASTSource for a GPUTarget does (GUIDE section 3). Used by every kernel's test file:

- the test file defines a module-level ``compile_cases()`` returning
  {case_key: (jit_kernel, signature, constexprs, num_warps, num_stages)}, importing its kernels
  inside the function;
- the ``compile_reports`` fixture (tests/conftest.py) is ``compile_in_subprocess(test_file)``:
  {f"{arch}-{case_key}": report dict} for every arch in ARCHS;
- each test passes one report to ``check_compile_report``: compiled, shared memory within the
  arch's budget, no register spills.

The interpreter (TRITON_INTERPRET=1, set by conftest without CUDA) replaces triton.language's
functions in the test process, so triton.compile cannot run there: the cases are compiled by
``python tests/compile_check.py <test_file> <arch>`` in fresh processes with TRITON_INTERPRET=0,
one per arch, side by side.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Shared memory one block may use (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


@dataclass
class CompileReport:
    arch: int
    shared_bytes: int
    registers: int | None
    local_bytes: int | None  # > 0 means register spills (or a local array)
    num_warps: int

    def __str__(self) -> str:
        return (f"sm_{self.arch}: shared={self.shared_bytes} B, regs={self.registers}, "
                f"local(spill)={self.local_bytes} B, warps={self.num_warps}")


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, *, num_warps: int = 4,
                   num_stages: int = 3) -> CompileReport:
    """triton.compile(fn) for cuda:sm_<arch>; raises whatever the compiler raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # jit functions wrapped by @triton.autotune / heuristics expose the raw kernel as .fn
    while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    full_signature = dict(signature)
    for name in constexprs:
        full_signature.setdefault(name, "constexpr")
    source = ASTSource(fn=fn, signature=full_signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    registers = local = None
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        finally:
            os.unlink(f.name)
        if match := re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage):
            registers, local = int(match.group(1)), int(match.group(2))
    return CompileReport(arch, int(compiled.metadata.shared), registers, local, num_warps)


def _compile_cases_of(test_file: str, arch: int) -> dict[str, dict]:
    """Compile every case of test_file's compile_cases() for sm_<arch> (in a process without the
    interpreter): {case_key: report dict, or {"error": ...} where the compiler raised}."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(test_file)))
    spec = importlib.util.spec_from_file_location(Path(test_file).stem, test_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reports = {}
    for key, (kernel, signature, constexprs, num_warps, num_stages) in module.compile_cases().items():
        try:
            r = compile_kernel(kernel, signature, constexprs, arch, num_warps=num_warps, num_stages=num_stages)
            reports[key] = dict(report=str(r), constexprs=constexprs, shared=r.shared_bytes,
                                local=r.local_bytes, max_shared=MAX_SHARED_BYTES[arch])
        except Exception as e:
            reports[key] = dict(error=f"{type(e).__name__}: {e}")
    return reports


def compile_in_subprocess(test_file, timeout: float = 600) -> dict[str, dict]:
    """{f"{arch}-{case_key}": report dict} for every case of test_file's compile_cases() and every
    arch in ARCHS; one fresh process per arch (TRITON_INTERPRET=0), run side by side."""
    env = dict(os.environ, TRITON_INTERPRET="0")  # "0" is off; conftest only sets it when unset
    runs = {arch: subprocess.Popen([sys.executable, os.path.abspath(__file__), str(test_file), str(arch)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for arch in ARCHS}
    reports = {}
    try:
        for arch, run in runs.items():
            out, err = run.communicate(timeout=timeout)
            assert run.returncode == 0, f"compiling {test_file} for sm_{arch} failed:\n{err[-4000:]}"
            for key, value in json.loads(out.split(_MARKER, 1)[1]).items():
                reports[f"{arch}-{key}"] = dict(value, key=f"{arch}-{key}")
    finally:
        for run in runs.values():  # the other arch's process, where one failed or timed out
            if run.poll() is None:
                run.kill()
                run.wait()
    return reports


def check_compile_report(result: dict) -> None:
    """One case of compile_in_subprocess: it compiled, its shared memory fits the arch, no spills."""
    assert "error" not in result, result.get("error")
    print(f"{result['key']}: {result['report']} {result['constexprs']}")
    assert result["shared"] <= result["max_shared"], f"shared memory overflow: {result['report']}"
    assert result["local"] in (None, 0), f"register spills: {result['report']}"


_MARKER = "COMPILE_REPORTS"

if __name__ == "__main__":  # python tests/compile_check.py <test_file> <arch>
    print(_MARKER + json.dumps(_compile_cases_of(sys.argv[1], int(sys.argv[2])), default=str))
