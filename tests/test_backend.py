"""The backend switch: auto / triton / torch, and the errors when Triton cannot run."""

import pytest
import torch

from fastsae import ops
from fastsae.ops import _backend


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTSAE_BACKEND", raising=False)
    assert not _backend.use_triton("topk_encode", torch.randn(2))


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
    monkeypatch.setitem(_backend._KERNELS, "topk_encode", ("no_such_kernel_module", "fn"))
    with pytest.raises(NotImplementedError, match="no Triton kernel for this op"):
        ops.topk_encode(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), 2, backend="triton")


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setitem(_backend._KERNELS, "relu_encode", ("_common", "__doc__"))  # any existing module
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        ops.relu_encode(torch.randn(2, 4), torch.randn(4, 6), torch.randn(6), backend="triton")


def test_forced_triton_refuses_float64_and_auto_keeps_it_on_the_reference(monkeypatch):
    x, W, b = torch.randn(2, 4).double(), torch.randn(4, 6).double(), torch.randn(6).double()
    with pytest.raises(TypeError, match="take float32/float16/bfloat16 inputs, got torch.float64"):
        ops.topk_encode(x, W, b, 2, backend="triton")
    assert not _backend.use_triton("topk_encode", x, W, b)  # auto: float64 never reaches a kernel


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_the_inputs_gpu():
    x, W, b = (t.to("cuda:1") for t in (torch.randn(8, 32), torch.randn(32, 64), torch.randn(64)))
    values, _ = ops.topk_encode(x, W, b, 4)
    torch.testing.assert_close(values, (x @ W + b).topk(4).values.relu())
