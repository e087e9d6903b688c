"""sparse_decode, forward + backward: the fused Triton kernels vs the PyTorch reference vs the dense form.

    fused      fastsae.ops.sparse_decode(backend="triton"): gather forward, one sorted-segment backward
    reference  fastsae.ops.sparse_decode(backend="torch"): chunked index_select / bmm / index_add_
    dense      scatter the code into a dense [N, n] tensor, addmm with W_dec, autograd backward

Shapes (N, k, n, d): the issue's N=4,096, k=32, d=768 at n = 24,576 / 49,152 / 131,072 / 2^20 on a
GPU ("full"); small shapes that the Triton interpreter gets through quickly on CPU ("small").
FASTSAE_BENCH_SIZE=small|full overrides the choice (benchmarks/conftest.py).

Byte count of one forward + backward of the sparse decoder (s = bytes per element of the dtype,
code = values + int64 indices), the figure effective GB/s is derived from:
    forward   N*k*(s+8)      read the code
            + N*k*d*s        gather W_dec rows, one per (token, slot)
            + N*d*s          write x_hat
    backward  N*k*(s+8)      read the code (index pre-pass + kernel)
            + N*k*d*s        gather grad_out rows, one per (token, slot)
            + min(n, N*k)*d*s  read W_dec rows, at most once per touched latent (for grad_values)
            + n*d*s          write grad_W_dec (every row, zeros included)
            + N*d*s          read grad_out for grad_b_dec
            + N*k*s          write grad_values
The dense form's figure of merit is FLOP/s: 6*N*n*d (forward GEMM, grad_acts and grad_W GEMMs),
reported for all three variants as "dense-equivalent TFLOP/s" so they compare on one scale.

Each result records the device, dtype, shapes, median time, effective GB/s and peak memory (CUDA:
max_memory_allocated; CPU: peak RSS growth in a fresh process). benchmarks/conftest.py measures
them and writes benchmarks/results/bench_sparse_decoder_<size>_<device>.json at the end of a run.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPE, HAS_CUDA, bench_size, peak_extra_bytes, time_step
from fastsae.ops import sparse_decode

SHAPES = {
    "full": [(4096, 32, n, 768) for n in (24_576, 49_152, 131_072, 1 << 20)],
    "small": [(64, 8, 512, 96), (64, 8, 2048, 96)],
}
VARIANTS = ("fused", "reference", "dense")


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


def make_step(shape, variant, dtype=DTYPE, device=DEVICE):
    """A closure running one forward + backward of `variant` at `shape` on fresh random inputs."""
    n_tokens, k, n_latents, d = shape
    generator = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(n_tokens, k, device=device, generator=generator).abs().to(dtype).requires_grad_()
    indices = torch.randint(0, n_latents, (n_tokens, k), device=device, generator=generator)
    W_dec = (torch.randn(n_latents, d, device=device, generator=generator) / d**0.5).to(dtype).requires_grad_()
    b_dec = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(n_tokens, d, device=device, generator=generator).to(dtype)
    decode = DECODERS[variant]

    def step():
        for leaf in (values, W_dec, b_dec):
            leaf.grad = None
        decode(values, indices, W_dec, b_dec).backward(grad_out)

    return step


def bytes_moved(shape, element_bytes: int) -> int:
    n_tokens, k, n_latents, d = shape
    s = element_bytes
    forward = n_tokens * k * (s + 8) + n_tokens * k * d * s + n_tokens * d * s
    backward = (n_tokens * k * (s + 8) + n_tokens * k * d * s + min(n_latents, n_tokens * k) * d * s
                + n_latents * d * s + n_tokens * d * s + n_tokens * k * s)
    return forward + backward


def dense_flops(shape) -> int:
    n_tokens, _, n_latents, d = shape
    return 6 * n_tokens * n_latents * d


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-k{}-n{}-d{}".format(*s))
def test_sparse_decode_fwd_bwd(benchmark, shape, variant):
    n_tokens, k, n_latents, d = shape
    if variant == "dense" and HAS_CUDA:
        dense_bytes = 2 * n_tokens * n_latents * DTYPE.itemsize  # the code and its gradient
        if dense_bytes > 0.4 * torch.cuda.get_device_properties(0).total_memory:
            pytest.skip(f"the dense [N, n] code needs {dense_bytes / 2**30:.1f} GiB")
    step = make_step(shape, variant)
    step()  # compile (GPU) / warm up before timing
    median = time_step(benchmark, step, "N{}-k{}-n{}-d{}".format(*shape),
                       dict(dtype=str(DTYPE), variant=variant, N=n_tokens, k=k, n_latents=n_latents, d=d,
                            bytes_fwd_bwd=bytes_moved(shape, DTYPE.itemsize), dense_flops_fwd_bwd=dense_flops(shape)))
    if median is None:  # CI smoke run: one call, no figures
        return
    benchmark.extra_info.update(
        effective_GBps=bytes_moved(shape, DTYPE.itemsize) / median / 1e9,
        dense_equivalent_TFLOPs=dense_flops(shape) / median / 1e12,
        peak_memory_bytes=peak_extra_bytes(step, make_step, shape, variant),
    )
