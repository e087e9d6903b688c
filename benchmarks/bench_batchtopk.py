"""A BatchTopK SAE's training pass: fastsae's exact selection from candidates vs TopK vs the naive form.

    fastsae    E2ESAE(activation="batchtopk").training_forward + backward: the TopK encoder keeps 2k
               candidates per token, the k x N-th largest of them is the threshold (wider
               candidates where a token's smallest one is above it), sparse decoder
    topk       the same SAE with activation="topk" and the same k: the per-token selection's cost
    dense      the naive form (SAELens's BatchTopK): the dense [N, n] pre-activations, ReLU, a topk
               of k x N over all of them, scattered into a dense code, dense decoder, autograd

Passes: "fwd_bwd" (a training step's SAE part: MSE + sparsity, backward). Shapes (N, d, n, k): on a
GPU the GPT-2 preset; on CPU ("full") 2,048 tokens of the preset's SAE, ("small") a tiny one.
Cost model: harness.batchtopk_cost (the encoder's backward runs over every candidate).
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPE, GPT2_PRESET, HAS_CUDA, batchtopk_cost, bench_size, measure

from fastsae import E2ESAE
from fastsae.activations.batchtopk import CANDIDATE_FACTOR

SHAPES = {
    "full": [tuple(GPT2_PRESET[key] for key in "Ndnk")] if HAS_CUDA else [(2048, 768, 46_080, 32)],
    "small": [(128, 64, 1024, 8)],
}
VARIANTS = ("fastsae", "topk", "dense")


def dense_step(sae, x):
    """SAELens's BatchTopK on the dense pre-activations, then a dense decoder."""
    acts = torch.relu(torch.addmm(sae.b_enc, x, sae.W_enc))
    flat = acts.flatten()
    top = flat.topk(sae.k * x.shape[0])
    code = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(acts)
    W_dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return code @ W_dec + sae.b_dec, code.sum(-1).mean() / sae.d_in


def make_step(shape, variant, dtype=DTYPE, device=DEVICE):
    n_tokens, d, n_latents, k = shape
    torch.manual_seed(0)
    activation = "topk" if variant == "topk" else "batchtopk"
    sae = E2ESAE(d, n_latents, activation, k=k, dtype=dtype, device=device)
    x = torch.randn(n_tokens, d, device=device, dtype=dtype)

    def step():
        sae.zero_grad(set_to_none=True)
        if variant == "dense":
            reconstruction, sparsity = dense_step(sae, x)
        else:
            out = sae.training_forward(x)
            reconstruction, sparsity = out.reconstruction, out.sparsity
        ((reconstruction - x).float().square().mean() + sparsity).backward()

    return step


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-d{}-n{}-k{}".format(*s))
def test_batchtopk(benchmark, shape, variant):
    n_tokens, d, n_latents, k = shape
    if variant == "dense" and HAS_CUDA and 4 * n_tokens * n_latents * DTYPE.itemsize > \
            0.4 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("the dense [N, n] tensors do not fit")
    step = make_step(shape, variant)
    step()  # compile (GPU) / warm up
    candidates = k if variant == "topk" else CANDIDATE_FACTOR * k
    if variant == "dense":
        candidates = n_latents
    flops, bytes_ = batchtopk_cost(n_tokens, d, n_latents, k, candidates, DTYPE.itemsize, "fwd_bwd")
    measure(benchmark, step, op="batchtopk", shape="N={} d={} n={} k={}".format(*shape), variant=variant,
            passes="fwd_bwd", dtype=DTYPE, flops=flops, bytes_=bytes_, triton=False, N=n_tokens, d=d,
            n_latents=n_latents, k=k)
