"""fused_linear_kl, forward + backward: the fused Triton kernel vs the chunked PyTorch reference vs
the naive dense form (materialized logits, log_softmax, kl_div(batchmean), autograd backward).

    pytest benchmarks/bench_linear_kl.py --benchmark-only               # measure
    FASTSAE_BENCH_SIZE=full pytest benchmarks/bench_linear_kl.py ...    # the issue's shapes

Full size (GPU): d = 768, V = 50,257 at N = 2,048 / 8,192 / 32,768, and d = 4,096, V = 128,256.
Small size (CPU default): tiny shapes, so that CI's --benchmark-disable run is quick (the fused
kernel then runs in Triton's interpreter: its CPU time means nothing). On CPU with
FASTSAE_BENCH_SIZE=full only the CPU target runs: reference vs naive at N = 2,048, d = 768,
V = 50,257. extra_info: device, dtype, shapes, effective TFLOP/s against the cost model's floor of
6*N*d*V FLOPs (GUIDE section 5), peak extra memory of one forward + backward. The results JSON
(benchmarks/results/bench_linear_kl_<size>_<device>.json) is written by benchmarks/conftest.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, bench_size, peak_extra_bytes, time_step

from fastsae import ops

IMPLS = ("fused", "reference", "naive")

# (N, d_model, d_vocab, dtype)
GPU_FULL = [(2048, 768, 50257, "bfloat16"), (8192, 768, 50257, "bfloat16"), (32768, 768, 50257, "bfloat16"),
            (8192, 4096, 128256, "bfloat16")]
CPU_TARGET = [(2048, 768, 50257, "float32")]  # the reference's CPU target (issue 4): <= 1.2x naive
SMALL = [(64, 64, 500, "float32"), (48, 96, 1000, "float32")]


def cases():
    if bench_size() == "small":
        return [(impl, shape) for shape in SMALL for impl in IMPLS]
    if HAS_CUDA:
        return [(impl, shape) for shape in GPU_FULL for impl in IMPLS]
    return [(impl, shape) for shape in CPU_TARGET for impl in ("reference", "naive")]


def make_step(impl, shape, device=DEVICE):
    """A closure running one forward + backward of `impl` at `shape` on fixed random inputs."""
    n, d, v, dtype = shape
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    h_orig = torch.randn(n, d, generator=gen)
    h_sae = (h_orig + 0.3 * torch.randn(n, d, generator=gen)).to(device, dt).requires_grad_()
    W_U = (torch.randn(d, v, generator=gen) / d ** 0.5 * 3).to(device, dt)
    b_U = torch.randn(v, generator=gen).to(device, dt)
    h_orig = h_orig.to(device, dt)

    def step():
        h_sae.grad = None
        if impl == "naive":
            log_q = F.log_softmax((h_sae @ W_U + b_U).float(), dim=-1)
            log_p = F.log_softmax((h_orig @ W_U + b_U).float(), dim=-1)
            loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        else:
            loss = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, backend="triton" if impl == "fused" else "torch")
        loss.backward()
        return loss

    return step


def _naive_fits_gpu(n, v) -> bool:
    # naive holds ~6 [N, V] fp32 tensors at its peak (logits, log-softmaxes, their gradients)
    return 6 * n * v * 4 < 0.8 * torch.cuda.get_device_properties(0).total_memory


@pytest.mark.parametrize("impl, shape", cases(), ids=lambda x: x if isinstance(x, str) else "N{}-d{}-V{}-{}".format(*x))
def test_linear_kl_forward_backward(benchmark, impl, shape):
    n, d, v, dtype = shape
    if HAS_CUDA and impl == "naive" and not _naive_fits_gpu(n, v):
        pytest.skip(f"naive form needs ~{6 * n * v * 4 / 2**30:.0f} GiB at N={n}, V={v}")
    step = make_step(impl, shape)
    slow = not HAS_CUDA and bench_size() == "full"  # seconds per call on CPU
    seconds = time_step(benchmark, step, f"linear_kl N={n} d={d} V={v} {dtype}",
                        dict(impl=impl, dtype=dtype, n_tokens=n, d_model=d, d_vocab=v, flop_floor=6 * n * d * v),
                        pedantic=dict(rounds=3, warmup_rounds=1, iterations=1) if slow else None)
    if seconds is not None:
        benchmark.extra_info["effective_tflops"] = 6 * n * d * v / seconds / 1e12
        benchmark.extra_info["peak_extra_mib"] = peak_extra_bytes(step, make_step, impl, shape, timeout=900) / 2**20
    del step
