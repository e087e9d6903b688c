"""The dashboard's collection pass (fastsae.dashboard.collect) against the naive dense form.

    streaming pass    DashboardCollector.update per batch: encode_sparse, then the per-latent top-k
                      contexts, the quantile samples, the token index and the LatentStats, all
                      merged batch by batch on the device (what `fastsae dashboard` runs)
    streaming top-k   the same pass for the top-k contexts alone: encode_sparse + SegmentTopK with
                      the context windows (what the naive row computes, and no more)
    naive dense       the dense code of every batch kept ([N, n] for the whole stream), then
                      torch.topk over the tokens per latent and the windows gathered from it

All three read the same token batches and activations (random, through a ReLU SAE whose biases
give an L0 of about 32, as trained SAEs have) and the naive and top-k rows give the same
top values and positions (checked before timing). Shapes (batches x tokens per batch, d, n): CPU
"small" 8 x 256 tokens, d 64, 1,024 latents; CPU "full" the embedded preset's SAE (d 128, 2,048
latents) over 16 x 2,048 tokens, whose dense code takes 256 MiB; on a GPU "full" the GPT-2 preset's
SAE (d 768, 46,080 latents) over 16 x 4,096 tokens (dense code 12 GB). FLOPs: the encoder GEMM,
2 N d n, which every row does. Peak memory: one whole pass above its inputs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from harness import DEVICE, HAS_CUDA, bench_size, measure

from fastsae import E2ESAE
from fastsae.dashboard.collect import EMPTY_TOKEN, BatchEntries, DashboardCollector, SegmentTopK

SHAPES = {  # (batches, tokens per batch, d, n)
    "small": [(8, 256, 64, 1024)],
    "full": [(16, 4096, 768, 46_080)] if HAS_CUDA else [(16, 2048, 128, 2048)],
}
TOP_K, BEFORE, AFTER, CTX, VOCAB = 20, 16, 6, 128, 50_257
TARGET_L0 = 32  # active latents per token, as trained SAEs (the embedded preset's e2e SAE: about 45)
VARIANTS = ("streaming pass", "streaming top-k", "naive dense")


def make_inputs(shape):
    n_batches, tokens_per_batch, d, n = shape
    torch.manual_seed(0)
    sae = E2ESAE(d, n, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    rows = tokens_per_batch // CTX
    xs = [torch.randn(rows, CTX, d, device=DEVICE, generator=g) for _ in range(n_batches)]
    with torch.no_grad():  # each latent's threshold at its (1 - L0 / n) quantile on a sample: L0 about TARGET_L0
        pre = xs[0].reshape(-1, d)[:1024] @ sae.W_enc + sae.b_enc
        sae.b_enc.sub_(pre.quantile(1 - TARGET_L0 / n, dim=0))
    tokens = [torch.randint(0, VOCAB, (rows, CTX), device=DEVICE, generator=g) for _ in range(n_batches)]
    return sae, xs, tokens


def streaming_pass(sae, xs, tokens):
    collector = DashboardCollector({"s": ("hook", sae)}, d_vocab=VOCAB, top_k=TOP_K, before=BEFORE, after=AFTER)
    for x, t in zip(xs, tokens):
        collector.update(t, {"hook": x})
    return collector.finish().records["s"].top


def streaming_top_k(sae, xs, tokens):
    window = BEFORE + 1 + AFTER
    top = SegmentTopK(sae.n_latents, TOP_K, {"position": ((), torch.int64), "tokens": ((window,), torch.int32),
                                             "acts": ((window,), torch.float32), "value": ((), torch.float32)},
                      device=DEVICE)
    seen = 0
    for x, t in zip(xs, tokens):
        code = sae.encode_sparse(x)
        batch = BatchEntries(t, code.values, code.indices, sae.n_latents, offset=seen)
        top.update(batch.latents, batch.values, functools.partial(batch.windows, before=BEFORE, after=AFTER))
        seen += t.numel()
    return top.sort_()


def naive_dense(sae, xs, tokens):
    """Dense codes of the whole stream, topk over the tokens, windows gathered from the dense code."""
    dense = torch.cat([sae.encode(x).reshape(-1, sae.n_latents) for x in xs])  # [N, n]
    flat_tokens = torch.cat([t.reshape(-1) for t in tokens])
    values, positions = dense.topk(TOP_K, dim=0)  # [k, n]
    values, positions = values.T, positions.T  # [n, k]
    offsets = torch.arange(-BEFORE, AFTER + 1, device=dense.device)
    cols = (positions % CTX)[..., None] + offsets
    inside = (cols >= 0) & (cols < CTX)
    where = (positions // CTX)[..., None] * CTX + cols.clamp(0, CTX - 1)
    window_tokens = torch.where(inside, flat_tokens[where], EMPTY_TOKEN)
    latents = torch.arange(sae.n_latents, device=dense.device)[:, None, None].expand_as(where)
    acts = torch.where(inside, dense[where, latents], 0.0)
    return values, positions, window_tokens, acts


RUNNERS = {"streaming pass": streaming_pass, "streaming top-k": streaming_top_k, "naive dense": naive_dense}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "{}x{}-d{}-n{}".format(*s))
def test_dashboard_collect(benchmark, shape, variant):
    n_batches, tokens_per_batch, d, n = shape
    n_tokens = n_batches * tokens_per_batch
    if variant == "naive dense" and HAS_CUDA:
        dense_bytes = n_tokens * n * 4
        if dense_bytes > 0.5 * torch.cuda.get_device_properties(0).total_memory:
            pytest.skip(f"the dense [N, n] code takes {dense_bytes / 2**30:.1f} GiB")
    sae, xs, tokens = make_inputs(shape)
    run = RUNNERS[variant]

    def step():
        with torch.no_grad():
            return run(sae, xs, tokens)

    result = step()  # warm-up, and the check that the rows compute the same top-k
    if variant != "naive dense":
        values, positions, _, _ = naive_dense(sae, xs, tokens)
        filled = result.keys > float("-inf")
        # naive topk pads latents that fired fewer than k times with zeros; compare the real entries
        assert torch.equal(result.keys[filled].float(), values[filled])
        assert (values[~filled] == 0).all()
        # positions: equal where the values are distinct (torch.topk does not promise an order for ties)
        distinct = filled.clone()
        distinct[:, 1:] &= result.keys[:, 1:] != result.keys[:, :-1]
        distinct[:, :-1] &= result.keys[:, :-1] != result.keys[:, 1:]
        assert torch.equal(result.payload["position"][distinct], positions[distinct])
    measure(benchmark, step, op="dashboard_collect",
            shape="{} tokens ({}x{}) d={} n={} k={}".format(n_tokens, n_batches, tokens_per_batch, d, n, TOP_K),
            variant=variant, passes="fwd", dtype=torch.float32, flops=2 * n_tokens * d * n, bytes_=None, triton=False,
            pedantic=dict(rounds=3, iterations=1, warmup_rounds=0), N=n_tokens, d=d, n_latents=n, k=TOP_K)
