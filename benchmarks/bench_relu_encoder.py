"""relu_encode: the fused Triton kernel vs the PyTorch reference (= the naive dense form) vs a GEMM.

    fused_auto    fastsae.ops.relu_encode(backend="triton"): GEMM with bias + ReLU epilogue; the
                  sparse backward (device-side compaction into a capacity-bounded code, rows past
                  the capacity on the dense-row path)
    fused_dense   the same forward, the dense backward (grad mask + two cuBLAS GEMMs)
    reference     relu(addmm(...)) with autograd: the PyTorch reference, which is also the naive
                  dense form of a ReLU encoder
    gemm          x @ W_enc alone: the target baseline for the forward

Codes: "dense" (b_enc = 0: about half the latents active, as at initialisation) and "sparse"
(b_enc = -3: ~0.1 % active, the L0 of a trained SAE). The sparse backward takes both with no host
sync (kernels/relu_encoder.py); fused_auto vs fused_dense on the dense code is what its per-row
fallback costs against plain GEMMs, to be measured on a GPU.
Shapes (N, d, n): the GPT-2 preset and d 4,096 with 131,072 latents on a GPU ("full"), small on
CPU. Cost model: harness.relu_encoder_cost (dense: 2*N*d*n forward, 6*N*d*n forward + backward).
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPE, GPT2_PRESET, HAS_CUDA, LARGE, bench_size, measure, relu_encoder_cost, variants

from fastsae.ops import relu_encode

SHAPES = {
    "full": [tuple(s[key] for key in "Ndn") for s in (GPT2_PRESET, LARGE)] if HAS_CUDA
    else [(1024, 768, 46_080)],  # CPU: the preset's encoder at 1,024 tokens
    "small": [(32, 64, 384)],  # tiny: the interpreter (--bench-interpreter) gets through
}
CODES = {"dense": 0.0, "sparse": -3.0}
TRITON_VARIANTS = ("fused_auto", "fused_dense")
VARIANTS = variants(TRITON_VARIANTS + ("reference", "gemm"), triton_variants=TRITON_VARIANTS)
PASSES = ("fwd", "fwd_bwd")


def _fused_dense_backward(x, w, b):
    # kernels/ is imported only when a fused row runs: the CPU default leaves them out
    from fastsae.kernels.relu_encoder import relu_encode_triton

    return relu_encode_triton(x, w, b, sparse_backward=False)


ENCODERS = {
    "fused_auto": lambda x, w, b: relu_encode(x, w, b, backend="triton"),
    "fused_dense": _fused_dense_backward,
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


def cases():
    """(code, variant, passes) combinations worth timing; the rest would only time the same thing."""
    out = []
    for code in CODES:
        for variant in VARIANTS:
            for passes in PASSES:
                if variant == "gemm" and (passes == "fwd_bwd" or code == "sparse"):
                    continue  # the GEMM baseline is a forward-only target, independent of the code
                if passes == "fwd" and variant == "fused_dense":
                    continue  # the backward path does not change the forward
                out.append((code, variant, passes))
    return out


CASES = cases()


@pytest.mark.parametrize("code, variant, passes", CASES, ids=["-".join(case) for case in CASES])
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-d{}-n{}".format(*s))
def test_relu_encode(benchmark, shape, code, variant, passes):
    n_tokens, d, n_latents = shape
    step = make_step(shape, code, variant, passes)
    step()  # compile (GPU) / warm up before timing
    flops, bytes_ = relu_encoder_cost(n_tokens, d, n_latents, DTYPE.itemsize, passes)
    measure(benchmark, step, op="relu_encode", shape="N={} d={} n={} {} code".format(*shape, code),
            variant=variant, passes=passes, dtype=DTYPE, flops=flops, bytes_=bytes_,
            triton=variant in TRITON_VARIANTS, N=n_tokens, d=d, n_latents=n_latents, code=code)
