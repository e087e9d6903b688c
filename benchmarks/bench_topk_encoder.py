"""topk_encode: the fused Triton kernel vs the PyTorch reference vs the naive dense form vs a GEMM.

    fused      fastsae.ops.topk_encode(backend="triton"): GEMM + bias + running top-k in one kernel
    reference  fastsae.ops.topk_encode(backend="torch"): chunked addmm + torch.topk
    dense      the naive form: addmm -> relu -> topk -> scatter into a dense [N, n] code
               (what a decoder that wants a dense code would get), autograd backward
    gemm       x @ W_enc alone (cuBLAS on a GPU): the bare GEMM the fused forward is held against

Passes: "fwd" (forward only) and "fwd_bwd" (forward + backward; not for gemm).
Shapes (N, d, n, k): on a GPU ("full") the GPT-2 preset (16 x 1,024 tokens, d 768, 46,080 latents,
k 32) and d 4,096 with 131,072 latents; on CPU ("small") a shape the interpreter gets through.
Cost model: harness.topk_encoder_cost (2*N*d*n forward; the backward is sparse, 4*N*k*d).
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPE, GPT2_PRESET, HAS_CUDA, LARGE, bench_size, measure, topk_encoder_cost, variants

from fastsae.ops import topk_encode

SHAPES = {
    "full": [tuple(s[key] for key in "Ndnk") for s in (GPT2_PRESET, LARGE)] if HAS_CUDA
    else [(1024, 768, 46_080, 32)],  # CPU: the preset's encoder at 1,024 tokens
    "small": [(64, 96, 512, 8)],  # tiny: the interpreter (--bench-interpreter) gets through
}
VARIANTS = variants(("fused", "reference", "dense", "gemm"), triton_variants=("fused",))
PASSES = ("fwd", "fwd_bwd")
CASES = [(v, p) for v in VARIANTS for p in PASSES if not (v == "gemm" and p == "fwd_bwd")]  # gemm: forward only


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


@pytest.mark.parametrize("variant, passes", CASES, ids=["-".join(case) for case in CASES])
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-d{}-n{}-k{}".format(*s))
def test_topk_encode(benchmark, shape, variant, passes):
    n_tokens, d, n_latents, k = shape
    if variant == "dense" and HAS_CUDA:
        dense_bytes = 4 * n_tokens * n_latents * DTYPE.itemsize  # pre, acts, code (+ grads)
        if dense_bytes > 0.4 * torch.cuda.get_device_properties(0).total_memory:
            pytest.skip(f"the dense [N, n] tensors need {dense_bytes / 2**30:.1f} GiB")
    step = make_step(shape, variant, passes)
    step()  # compile (GPU) / warm up before timing
    flops, bytes_ = topk_encoder_cost(n_tokens, d, n_latents, k, DTYPE.itemsize, passes)
    measure(benchmark, step, op="topk_encode", shape="N={} d={} n={} k={}".format(*shape), variant=variant,
            passes=passes, dtype=DTYPE, flops=flops, bytes_=bytes_, triton=variant == "fused",
            N=n_tokens, d=d, n_latents=n_latents, k=k)
