"""topk_encode: the fused Triton kernel vs the PyTorch reference vs the naive dense form vs a GEMM.

    fused      fastsae.ops.topk_encode(backend="triton"): GEMM + bias + running top-k in one kernel
    reference  fastsae.ops.topk_encode(backend="torch"): chunked addmm + torch.topk
    dense      the naive form: addmm -> relu -> topk -> scatter into a dense [N, n] code
               (what a decoder that wants a dense code would get), autograd backward
    gemm       x @ W_enc alone (cuBLAS on a GPU): the target baseline. On an H100 the fused
               forward should stay within 1.25x of it.

Passes: "fwd" (forward only) and "fwd_bwd" (forward + backward; not for gemm).
Shapes (N, d, n, k): the issue's N=4,096, d=768, k=32 at n = 24,576 / 49,152 / 131,072 / 2^20 on
a GPU ("full"); small shapes that the Triton interpreter gets through on CPU ("small").
FASTSAE_BENCH_SIZE=small|full overrides (benchmarks/conftest.py).

Effective TFLOP/s = 2*N*d*n / time (the GUIDE's cost model: the forward GEMM is the unavoidable
work; the fwd_bwd figure uses the same numerator, so it reads as "forward-GEMM-equivalents").
Each result records device, dtype, shapes, median time, TFLOP/s and peak memory (CUDA:
max_memory_allocated; CPU: peak RSS growth in a fresh process). benchmarks/conftest.py measures
them and writes benchmarks/results/bench_topk_encoder_<size>_<device>.json at the end of a run.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPE, HAS_CUDA, bench_size, peak_extra_bytes, time_step
from fastsae.ops import topk_encode

SHAPES = {
    "full": [(4096, 768, n, 32) for n in (24_576, 49_152, 131_072, 1 << 20)],
    "small": [(64, 96, 512, 8), (32, 96, 1024, 32)],
}
VARIANTS = ("fused", "reference", "dense", "gemm")
PASSES = ("fwd", "fwd_bwd")


def dense_form(x, W_enc, b_enc, k):
    """The naive encoder: full pre-activations, ReLU, topk, scattered back into a dense code."""
    acts = torch.relu(torch.addmm(b_enc, x, W_enc))
    top = acts.topk(k, dim=1)
    return torch.zeros_like(acts).scatter(1, top.indices, top.values)


ENCODERS = {
    "fused": lambda x, w, b, k: topk_encode(x, w, b, k, backend="triton")[0],
    "reference": lambda x, w, b, k: topk_encode(x, w, b, k, backend="torch")[0],
    "dense": dense_form,
    "gemm": lambda x, w, b, k: x @ w,
}


def make_step(shape, variant, passes, dtype=DTYPE, device=DEVICE):
    """A closure running one forward (+ backward) of `variant` at `shape` on fixed random inputs."""
    n_tokens, d, n_latents, k = shape
    generator = torch.Generator(device=device).manual_seed(0)
    backward = passes == "fwd_bwd"
    x = torch.randn(n_tokens, d, device=device, generator=generator).to(dtype).requires_grad_(backward)
    W_enc = (torch.randn(d, n_latents, device=device, generator=generator) / d**0.5).to(dtype)
    W_enc.requires_grad_(backward)
    b_enc = torch.zeros(n_latents, device=device, dtype=dtype, requires_grad=backward)
    encode = ENCODERS[variant]

    def step():
        if not backward:
            with torch.no_grad():
                return encode(x, W_enc, b_enc, k)
        for leaf in (x, W_enc, b_enc):
            leaf.grad = None
        out = encode(x, W_enc, b_enc, k)
        out.backward(torch.ones_like(out))

    return step


def gemm_flops(shape) -> int:
    n_tokens, d, n_latents, _ = shape
    return 2 * n_tokens * d * n_latents


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-d{}-n{}-k{}".format(*s))
def test_topk_encode(benchmark, shape, variant, passes):
    n_tokens, d, n_latents, k = shape
    if variant == "gemm" and passes == "fwd_bwd":
        pytest.skip("the GEMM baseline is a forward-only target")
    if variant == "dense" and HAS_CUDA:
        dense_bytes = 4 * n_tokens * n_latents * DTYPE.itemsize  # pre, acts, code (+ grads)
        if dense_bytes > 0.4 * torch.cuda.get_device_properties(0).total_memory:
            pytest.skip(f"the dense [N, n] tensors need {dense_bytes / 2**30:.1f} GiB")
    step = make_step(shape, variant, passes)
    step()  # compile (GPU) / warm up before timing
    median = time_step(benchmark, step, "{}-N{}-d{}-n{}-k{}".format(passes, *shape),
                       dict(dtype=str(DTYPE), variant=variant, passes=passes, N=n_tokens, d=d,
                            n_latents=n_latents, k=k, gemm_flops=gemm_flops(shape)))
    if median is None:  # CI smoke run: one call, no figures
        return
    benchmark.extra_info.update(
        effective_TFLOPs=gemm_flops(shape) / median / 1e12,
        peak_memory_bytes=peak_extra_bytes(step, make_step, shape, variant, passes),
    )
