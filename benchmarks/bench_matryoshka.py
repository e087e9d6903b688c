"""Matryoshka BatchTopK's prefix reconstructions from one selection code: two ways to decode them.

    segmented  what fastsae.activations.matryoshka does (MatryoshkaBatchTopK.prefix_reconstructions):
               a segmented prefix sum: the code's kept entries sorted by latent id, each group of
               latents (between two prefix widths) compacted to its widest token's count (rounded
               up to 16; the counts read back from the device together, one host sync) and decoded
               once, the groups' partial sums accumulated, so every kept entry is decoded once,
               the whole reconstruction included
    masked     a decode per prefix: the whole code decoded, then each inner prefix w decoded from
               the same entries with the ids >= w masked to 0, each a fastsae.ops.sparse_decode of
               the code's full width (no sort, no host sync)
    batchtopk  the whole code decoded alone (a BatchTopK SAE's decode), for scale

Pass "fwd_bwd": every prefix's reconstruction, the sum of their MSEs, backward to the code's values,
W_dec and b_dec (the encoder is the same in every row and left out). The code is a BatchTopK
selection of a random SAE (2k candidates per token or more, about k kept; the code keeps all its
slots, the unkept ones 0). Each row's FLOPs and bytes are the cost model's for what it decodes
(sparse_decoder_cost per decode: for "masked" G = groups decodes of the code's width; for
"segmented" one decode per group at its compacted width, plus the sort and the running sums), so
the table compares the two by work as well as by time. Before timing, both ways are checked
against the dense prefix sums (code.to_dense()[:, :w] @ W_dec[:w] + b_dec).

test_matryoshka_training_pass: the whole training pass (TopK encoder with 2k candidates, batch
selection, prefix decodes, every prefix's MSE, backward) of a Matryoshka BatchTopK SAE against a
BatchTopK SAE of the same shape: what the prefixes add to a step.

Shapes (N, d, n, k, inner widths): "small" the embedded preset's SAE with two inner prefixes, "full"
the GPT-2 preset's dictionary with three.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, DTYPE, HAS_CUDA, batchtopk_cost, bench_size, measure, sparse_decoder_cost

from fastsae import E2ESAE
from fastsae.activations import SparseCode, TrainingSettings

SHAPES = {
    "full": [(2048, 768, 46_080, 32, (1440, 5760, 23_040))],
    "small": [(2048, 128, 2048, 32, (128, 512))],
}
VARIANTS = ("segmented", "masked", "batchtopk")
_ids = lambda s: "N{}-d{}-n{}-k{}-groups{}".format(*s[:4], len(s[4]) + 1)  # noqa: E731


def selection(shape, dtype=DTYPE, device=DEVICE):
    """(an E2ESAE in training mode, x, the BatchTopK code of x)."""
    n_tokens, d, n_latents, k, widths = shape
    torch.manual_seed(0)
    sae = E2ESAE(d, n_latents, "matryoshka_batchtopk", k=k, widths=list(widths), dtype=dtype, device=device)
    x = torch.randn(n_tokens, d, device=device, dtype=dtype)
    with torch.no_grad():
        code = sae.encode(x)
    return sae, x, code


def masked(sae, code, widths):
    """The whole reconstruction and each inner prefix's, by a decode per prefix (the later ids masked)."""
    full = sae.decode(code)
    inner = [sae.decode(SparseCode(torch.where(code.indices < w, code.values, 0), code.indices)) for w in widths]
    return [*inner, full]


def segmented(sae, code, widths):
    """The same by the module's segmented prefix sum: each group's kept entries compacted and
    decoded once."""
    return sae.activation_fn.prefix_reconstructions(sae, code)


def dense_prefixes(sae, code, widths):
    """The spec: each prefix's dense code times its decoder rows (memory N x n: small shapes only)."""
    dense = code.to_dense(sae.n_latents)
    decoder = sae.normalised_decoder()
    return [dense[:, :w] @ decoder[:w] + sae.b_dec for w in (*widths, sae.n_latents)]


def group_widths(code, widths) -> list[int]:
    """Per group of latents, the compacted width of the segmented decode: the largest number of
    kept entries any token has in it, rounded up to 16, at most the code's width."""
    group = torch.bucketize(code.indices, torch.tensor(widths, device=code.indices.device), right=True)
    kept = code.values > 0
    most = [int(((group == g) & kept).sum(-1).max()) for g in range(len(widths) + 1)]
    return [min(code.values.shape[-1], max(16, -(-m // 16) * 16)) for m in most]


def prefix_cost(variant, code, widths, n_latents, d, s):
    """(FLOPs, bytes) per call of one way of decoding, from the cost model's sparse decode."""
    n_tokens, width = code.values.shape
    if variant == "batchtopk":
        return sparse_decoder_cost(n_tokens, width, n_latents, d, s, "fwd_bwd")
    if variant == "masked":  # G decodes of the full width, and the G - 1 masked value copies
        flops, bytes_ = sparse_decoder_cost(n_tokens, width, n_latents, d, s, "fwd_bwd")
        groups = len(widths) + 1
        return groups * flops, groups * bytes_ + len(widths) * n_tokens * width * (2 * s + 8)
    flops = bytes_ = 0
    for w in group_widths(code, widths):  # one decode per group, compacted; the fp32 running sum
        f, b = sparse_decoder_cost(n_tokens, w, n_latents, d, s, "fwd_bwd")
        flops, bytes_ = flops + f + 2 * n_tokens * d, bytes_ + b + n_tokens * w * (2 * s + 16) + 4 * n_tokens * d * 4
    sort = n_tokens * width * (4 * 8 + 2 * s)  # key built and sorted (ids, order); values and ids gathered
    return flops, bytes_ + sort


def make_step(shape, variant):
    sae, x, code = selection(shape)
    widths = list(shape[4])
    values = code.values.detach().clone().requires_grad_(True)

    def step():
        sae.zero_grad(set_to_none=True)
        values.grad = None
        live = SparseCode(values, code.indices)
        if variant == "batchtopk":
            outs = [sae.decode(live)]
        else:
            outs = (masked if variant == "masked" else segmented)(sae, live, widths)
        sum((out - x).float().square().mean() for out in outs).backward()

    return step, sae, x, code


def check_the_variants_agree(shape):
    """Both ways give every prefix's reconstruction: the dense prefix sums, to float rounding."""
    _, sae, _, code = make_step(shape, "segmented")
    widths = list(shape[4])
    with torch.no_grad():
        want = dense_prefixes(sae, code, widths) if shape[0] * shape[2] <= 2**24 else masked(sae, code, widths)
        for way in (masked, segmented):
            for got, expected in zip(way(sae, code, widths), want):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=_ids)
def test_matryoshka_prefixes(benchmark, shape, variant):
    n_tokens, d, n_latents, k, widths = shape
    if variant == "segmented":
        check_the_variants_agree(shape)
    step, _, _, code = make_step(shape, variant)
    step()  # warm up
    flops, bytes_ = prefix_cost(variant, code, widths, n_latents, d, DTYPE.itemsize)
    measure(benchmark, step, op="matryoshka_prefixes", shape="N={} d={} n={} k={} groups={}".format(
        n_tokens, d, n_latents, k, len(widths) + 1), variant=variant, passes="fwd_bwd", dtype=DTYPE,
        flops=flops, bytes_=bytes_, triton=HAS_CUDA, N=n_tokens, d=d, n_latents=n_latents, k=k, widths=list(widths),
        code_width=code.values.shape[-1], group_widths=group_widths(code, widths))


@pytest.mark.parametrize("variant", ["matryoshka", "batchtopk"])
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=_ids)
def test_matryoshka_training_pass(benchmark, shape, variant):
    n_tokens, d, n_latents, k, widths = shape
    torch.manual_seed(0)
    params = {"k": k, "widths": list(widths)} if variant == "matryoshka" else {"k": k}
    sae = E2ESAE(d, n_latents, "matryoshka_batchtopk" if variant == "matryoshka" else "batchtopk", dtype=DTYPE,
                 device=DEVICE, **params)
    x = torch.randn(n_tokens, d, device=DEVICE, dtype=DTYPE)
    settings = TrainingSettings()

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae.training_forward(x, settings=settings)
        loss = (out.reconstruction - x).float().square().mean() + sum(t.value for t in out.terms.values())
        loss.backward()

    step()  # warm up (and any widening of the candidates)
    candidates = sae.activation_fn.candidates(n_latents)
    flops, bytes_ = batchtopk_cost(n_tokens, d, n_latents, k, candidates, DTYPE.itemsize, "fwd_bwd")
    if variant == "matryoshka":  # the segmented prefix decodes in place of the one decode
        with torch.no_grad():
            code = sae.train().encode(x)
        decode = sparse_decoder_cost(n_tokens, candidates, n_latents, d, DTYPE.itemsize, "fwd_bwd")
        prefixes = prefix_cost("segmented", code, widths, n_latents, d, DTYPE.itemsize)
        flops, bytes_ = flops - decode[0] + prefixes[0], bytes_ - decode[1] + prefixes[1]
    measure(benchmark, step, op="matryoshka_pass", shape="N={} d={} n={} k={} groups={}".format(
        n_tokens, d, n_latents, k, len(widths) + 1), variant=variant, passes="fwd_bwd", dtype=DTYPE,
        flops=flops, bytes_=bytes_, triton=HAS_CUDA, N=n_tokens, d=d, n_latents=n_latents, k=k,
        widths=list(widths), candidates=candidates)
