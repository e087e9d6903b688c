"""relu_encode: the fused Triton kernel vs the PyTorch reference (= the naive dense form) vs a GEMM.

    fused_auto    fastsae.ops.relu_encode(backend="triton"): GEMM with bias + ReLU epilogue;
                  backward picks dense or sparse by the measured density
    fused_dense   the same forward, backward forced dense (two GEMMs)
    fused_sparse  the same forward, backward forced sparse (compaction + sparse kernels)
    reference     relu(addmm(...)) with autograd: the PyTorch reference, which is also the naive
                  dense form of a ReLU encoder
    gemm          x @ W_enc alone: the target baseline for the forward

Codes: "dense" (b_enc = 0: about half the latents active, as at initialisation) and "sparse"
(b_enc = -3: ~0.1 % active, the L0 of a trained SAE). The sparse backward's break-even density is
kernels/relu_encoder.py's SPARSE_DENSITY_THRESHOLD; these runs are how to re-measure it on a GPU.
Shapes (N, d, n): N=4,096, d=768 at n = 24,576 / 49,152 / 131,072 on a GPU ("full"); small
shapes on CPU ("small"). Effective TFLOP/s = 2*N*d*n / time (fwd) or 6*N*d*n / time (fwd_bwd,
the dense work a ReLU encoder's forward + backward would do).
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPE, HAS_CUDA, bench_size, peak_extra_bytes, time_step
from fastsae.kernels.relu_encoder import relu_encode_triton
from fastsae.ops import relu_encode

SHAPES = {
    "full": [(4096, 768, n) for n in (24_576, 49_152, 131_072)],
    "small": [(32, 64, 384)],
}
CODES = {"dense": 0.0, "sparse": -3.0}
VARIANTS = ("fused_auto", "fused_dense", "fused_sparse", "reference", "gemm")
PASSES = ("fwd", "fwd_bwd")

ENCODERS = {
    "fused_auto": lambda x, w, b: relu_encode(x, w, b, backend="triton"),
    "fused_dense": lambda x, w, b: relu_encode_triton(x, w, b, sparse_backward=False),
    "fused_sparse": lambda x, w, b: relu_encode_triton(x, w, b, sparse_backward=True),
    "reference": lambda x, w, b: relu_encode(x, w, b, backend="torch"),
    "gemm": lambda x, w, b: x @ w,
}


def make_step(shape, code, variant, passes, dtype=DTYPE, device=DEVICE):
    n_tokens, d, n_latents = shape
    generator = torch.Generator(device=device).manual_seed(0)
    backward = passes == "fwd_bwd"
    x = torch.randn(n_tokens, d, device=device, generator=generator).to(dtype).requires_grad_(backward)
    W_enc = (torch.randn(d, n_latents, device=device, generator=generator) / d**0.5).to(dtype)
    W_enc.requires_grad_(backward)
    b_enc = torch.full((n_latents,), CODES[code], device=device, dtype=dtype, requires_grad=backward)
    encode = ENCODERS[variant]

    def step():
        if not backward:
            with torch.no_grad():
                return encode(x, W_enc, b_enc)
        for leaf in (x, W_enc, b_enc):
            leaf.grad = None
        out = encode(x, W_enc, b_enc)
        out.backward(torch.ones_like(out))

    return step


def flops(shape, passes) -> int:
    n_tokens, d, n_latents = shape
    return (2 if passes == "fwd" else 6) * n_tokens * d * n_latents


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("code", list(CODES))
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-d{}-n{}".format(*s))
def test_relu_encode(benchmark, shape, code, variant, passes):
    if variant == "gemm" and (passes == "fwd_bwd" or code == "sparse"):
        pytest.skip("the GEMM baseline is a forward-only target, independent of the code")
    if passes == "fwd" and variant in ("fused_dense", "fused_sparse"):
        pytest.skip("the backward path does not change the forward")
    if variant == "fused_sparse" and code == "dense" and HAS_CUDA:
        pytest.skip("the sparse backward on a half-dense code is the case the density switch avoids")
    n_tokens, d, n_latents = shape
    step = make_step(shape, code, variant, passes)
    step()  # compile (GPU) / warm up before timing
    median = time_step(benchmark, step, "{}-{}-N{}-d{}-n{}".format(passes, code, *shape),
                       dict(dtype=str(DTYPE), variant=variant, passes=passes, code=code, N=n_tokens, d=d,
                            n_latents=n_latents, flops=flops(shape, passes)))
    if median is None:  # CI smoke run: one call, no figures
        return
    benchmark.extra_info.update(
        effective_TFLOPs=flops(shape, passes) / median / 1e12,
        peak_memory_bytes=peak_extra_bytes(step, make_step, shape, code, variant, passes),
    )
