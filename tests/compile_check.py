"""Compile a Triton kernel for sm_80 / sm_90 with no GPU present, and report its resources.

Triton's interpreter runs kernels on CPU but cannot see what only the GPU compiler catches:
unsupported tl.dot shapes, layout errors, shared-memory overflow, register spills. Compiling
through ASTSource for a GPUTarget does (GUIDE section 3). Used by every kernel's test file.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

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


def assert_compiles(fn, signature: dict, constexprs: dict, arch: int, **options) -> CompileReport:
    report = compile_kernel(fn, signature, constexprs, arch, **options)
    assert report.shared_bytes <= MAX_SHARED_BYTES[arch], f"shared memory overflow: {report}"
    print(report)
    return report
