"""The backend switch: auto / triton / torch, and the errors when Triton cannot run."""

import pytest
import torch

from fastsae import ops
from fastsae.ops import _backend


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    from fastsae.ops import topk_encoder

    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    assert not _backend.use_triton("topk_encode", topk_encoder.kernels, torch.randn(2))


def test_env_var_and_argument_are_validated(monkeypatch):
    monkeypatch.setenv("FASTSAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTSAE_BACKEND='cuda' is not a backend"):
        _backend.requested_backend()
    with pytest.raises(ValueError, match="backend='jax' is not a backend"):
        ops.topk_encode(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), 2, backend="jax")
    monkeypatch.setenv("FASTSAE_BACKEND", "torch")
    values, _ = ops.topk_encode(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), 2)
    assert values.shape == (2, 2)


def test_forced_triton_without_a_kernel_says_so(monkeypatch):
    from fastsae.ops import topk_encoder

    monkeypatch.setattr(topk_encoder, "kernels", None)  # as where triton is not installed
    with pytest.raises(NotImplementedError, match="no Triton kernel for this op"):
        ops.topk_encode(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), 2, backend="triton")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from fastsae.ops import relu_encoder

    monkeypatch.setattr(relu_encoder, "kernels", object())  # a kernel module, where triton may be missing
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        ops.relu_encode(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), backend="triton")


def test_forced_triton_refuses_float64_and_auto_keeps_it_on_the_reference(monkeypatch):
    x, W, b = torch.randn(2, 4).double(), torch.randn(4, 6).double(), torch.randn(6).double()
    with pytest.raises(TypeError, match="take float32/float16/bfloat16 inputs, got torch.float64"):
        ops.topk_encode(x, W, b, 2, backend="triton")
    assert not _backend.use_triton("topk_encode", object(), x, W, b)  # auto: float64 never reaches a kernel


# Imports triton's absence: a finder ahead of every other that says there is no such module.
_WITHOUT_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())
import torch
import fastsae
from fastsae import ops
from fastsae.ops import topk_encoder

assert topk_encoder.kernels is None and not any(m.split(".")[0] == "triton" for m in sys.modules)
values, _ = ops.topk_encode(torch.randn(3, 4), torch.randn(4, 6), torch.randn(6), 2)
assert values.shape == (3, 2)
try:
    ops.topk_encode(torch.randn(3, 4), torch.randn(4, 6), torch.randn(6), 2, backend="triton")
except NotImplementedError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("a forced Triton backend ran without triton")
"""


def test_fastsae_imports_and_runs_its_references_without_triton():
    """triton is optional: with it missing, the ops import (each op's kernel module is then None),
    "auto" takes the references, and a forced Triton backend says why it cannot run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "FASTSAE_BACKEND": "auto"})
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_kernel_module_missing_something_else_is_an_error():
    """Only triton's absence is tolerated: a kernel module that fails on another missing module is
    a broken install, and the import says so."""
    with pytest.raises(ModuleNotFoundError, match="numpyx"):
        _backend.missing_triton(ModuleNotFoundError("No module named 'numpyx'", name="numpyx"))
    assert _backend.missing_triton(ModuleNotFoundError("No module named 'triton'", name="triton")) is None


def test_a_broken_triton_turns_the_kernels_off_with_a_warning(monkeypatch):
    """A triton that is installed but fails to import (a driver or version mismatch) must not break
    CPU use: the kernels are off, with a warning naming the error; an error of the kernel module
    itself (triton importing fine) still raises."""
    import builtins

    real_import = builtins.__import__

    def broken_triton(name, *args, **kwargs):
        if name.split(".")[0] == "triton":
            raise ImportError("libcuda.so.1: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_triton)
    with pytest.warns(RuntimeWarning, match="triton does not import.*libcuda"):
        assert _backend.missing_triton(ImportError("cannot import name 'x' from 'triton'")) is None
    monkeypatch.setattr(builtins, "__import__", real_import)
    with pytest.raises(ImportError, match="the kernel module's own"):
        _backend.missing_triton(ImportError("the kernel module's own error"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_inputs_gpu():
    x, W, b = (t.to("cuda:1") for t in (torch.randn(8, 32), torch.randn(32, 64), torch.randn(64)))
    values, _ = ops.topk_encode(x, W, b, 4)
    torch.testing.assert_close(values, (x @ W + b).topk(4).values.relu())
