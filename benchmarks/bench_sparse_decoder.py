"""sparse_decode, forward and forward + backward: the fused Triton kernels vs the PyTorch reference
vs the dense form.

    fused      fastsae.ops.sparse_decode(backend="triton"): gather forward, one sorted-segment backward
    reference  fastsae.ops.sparse_decode(backend="torch"): chunked index_select / bmm / index_add_
    dense      scatter the code into a dense [N, n] tensor, addmm with W_dec, autograd backward

Shapes (N, k, n, d): the GPT-2 preset (16 x 1,024 tokens, k 32, 46,080 latents, d 768) and d 4,096
with 131,072 latents on a GPU ("full"); small on CPU. The op is bound by memory traffic: its
figure of merit is GB/s against harness.sparse_decoder_cost's byte count (code, the k gathered
rows per token, x_hat; in the backward also grad_W_dec, every row, zeros included).
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPE, GPT2_PRESET, HAS_CUDA, LARGE, bench_size, measure, sparse_decoder_cost, variants

from fastsae.ops import sparse_decode

SHAPES = {
    "full": [tuple(s[key] for key in "Nknd") for s in (GPT2_PRESET, LARGE)] if HAS_CUDA
    else [(1024, 32, 46_080, 768)],  # CPU: the preset's decoder at 1,024 tokens
    "small": [(64, 8, 512, 96)],  # tiny: the interpreter (--bench-interpreter) gets through
}
VARIANTS = variants(("fused", "reference", "dense"), triton_variants=("fused",))
PASSES = ("fwd", "fwd_bwd")


def dense_form(values, indices, W_dec, b_dec):
    """The naive decoder: a dense [N, n] code (scatter_add keeps repeated latents summed), one GEMM."""
    acts = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    acts = acts.scatter_add(1, indices, values)
    return torch.addmm(b_dec, acts, W_dec)


DECODERS = {
    "fused": lambda v, i, w, b: sparse_decode(v, i, w, b, backend="triton"),
    "reference": lambda v, i, w, b: sparse_decode(v, i, w, b, backend="torch"),
    "dense": dense_form,
}


def make_step(shape, variant, passes, dtype=DTYPE, device=DEVICE):
    """A closure running one forward (+ backward) of `variant` at `shape` on fixed random inputs."""
    n_tokens, k, n_latents, d = shape
    generator = torch.Generator(device=device).manual_seed(0)
    backward = passes == "fwd_bwd"
    values = torch.randn(n_tokens, k, device=device, generator=generator).abs().to(dtype).requires_grad_(backward)
    indices = torch.randint(0, n_latents, (n_tokens, k), device=device, generator=generator)
    W_dec = (torch.randn(n_latents, d, device=device, generator=generator) / d**0.5).to(dtype)
    W_dec.requires_grad_(backward)
    b_dec = torch.zeros(d, device=device, dtype=dtype, requires_grad=backward)
    grad_out = torch.randn(n_tokens, d, device=device, generator=generator).to(dtype)
    decode = DECODERS[variant]

    def step():
        if not backward:
            with torch.no_grad():
                return decode(values, indices, W_dec, b_dec)
        for leaf in (values, W_dec, b_dec):
            leaf.grad = None
        decode(values, indices, W_dec, b_dec).backward(grad_out)

    return step


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-k{}-n{}-d{}".format(*s))
def test_sparse_decode(benchmark, shape, variant, passes):
    n_tokens, k, n_latents, d = shape
    if variant == "dense" and HAS_CUDA:
        dense_bytes = 2 * n_tokens * n_latents * DTYPE.itemsize  # the code and its gradient
        if dense_bytes > 0.4 * torch.cuda.get_device_properties(0).total_memory:
            pytest.skip(f"the dense [N, n] code needs {dense_bytes / 2**30:.1f} GiB")
    step = make_step(shape, variant, passes)
    step()  # compile (GPU) / warm up before timing
    flops, bytes_ = sparse_decoder_cost(n_tokens, k, n_latents, d, DTYPE.itemsize, passes)
    measure(benchmark, step, op="sparse_decode", shape="N={} k={} n={} d={}".format(*shape), variant=variant,
            passes=passes, dtype=DTYPE, flops=flops, bytes_=bytes_, triton=variant == "fused",
            N=n_tokens, k=k, n_latents=n_latents, d=d)
