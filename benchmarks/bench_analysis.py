"""fastsae.analysis: the streamed per-latent statistics and the blocked max cosine similarity against
their naive dense forms.

    latent_stats   streamed  E2ESAE.encode_sparse + LatentStats.update (no [N, n] tensor)
                   dense     the dense ReLU code [N, n], then count, sum, max and histogram over it
    max_cosine     blocked   fastsae.analysis.max_cosine_similarity within one dictionary: blocks on and
                             above the diagonal, a running max (no [n, n] tensor)
                   dense     the [n, n] similarity matrix, its diagonal masked, max per row

Shapes: on CPU "small" (N 2,048 tokens, d 128, 4,096 latents), "full" (the paper's dictionary: d 768,
46,080 latents; the statistics over 2,048 tokens; the similarity at 16,384 latents against the dense
matrix and at all 46,080 latents blocked alone, whose dense matrix takes 8.5 GB). On a GPU "full"
runs the 46,080-latent similarity both ways in TF32. FLOPs: the encoder GEMM (2 N d n) for the
statistics; n (n - 1) d multiply-adds (each pair once) for the similarity, whichever way it runs.
"""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, HAS_CUDA, bench_size, measure

from fastsae import E2ESAE
from fastsae.analysis import LatentStats, max_cosine_similarity
from fastsae.analysis.latent_stats import BIN_EDGES, N_BINS

STATS_SHAPES = {"small": [(2048, 128, 4096)], "full": [(2048, 768, 46_080)]}  # (N, d, n)
SIM_SHAPES = {"small": [(4096, 128)], "full": [(16_384, 768), (46_080, 768)]}  # (n, d)
DENSE_SIM_LIMIT = 20_000 if not HAS_CUDA else 50_000  # latents up to which the dense matrix is timed


def make_sae(d, n):
    torch.manual_seed(0)
    sae = E2ESAE(d, n, device=DEVICE)
    with torch.no_grad():
        sae.b_enc.sub_(1.2)  # a sparse code (pre-activations ~ N(0, 0.58^2)): L0 about 2 %, as trained ReLU SAEs have
    return sae


def dense_stats(sae, x):
    acts = sae.encode(x)  # [N, n]
    active = acts > 0
    bins = torch.bucketize(acts.double(), BIN_EDGES.to(acts.device), right=True)
    hist = torch.zeros(sae.n_latents, N_BINS, dtype=torch.int64, device=acts.device)
    hist.view(-1).index_add_(0, (torch.arange(sae.n_latents, device=acts.device) * N_BINS + bins).reshape(-1),
                             active.reshape(-1).long())
    return active.sum(0), acts.double().sum(0), acts.max(0).values, hist


@pytest.mark.parametrize("variant", ["streamed", "dense"])
@pytest.mark.parametrize("shape", STATS_SHAPES[bench_size()], ids=lambda s: "N{}-d{}-n{}".format(*s))
def test_latent_stats(benchmark, shape, variant):
    n_tokens, d, n = shape
    sae = make_sae(d, n)
    x = torch.randn(n_tokens, d, device=DEVICE)

    def step():
        with torch.no_grad():
            if variant == "streamed":
                return LatentStats(n, device=DEVICE).update(sae.encode_sparse(x))
            return dense_stats(sae, x)

    step()
    measure(benchmark, step, op="latent_stats", shape="N={} d={} n={}".format(*shape), variant=variant, passes="fwd",
            dtype=torch.float32, flops=2 * n_tokens * d * n, bytes_=None, triton=False,
            pedantic=dict(rounds=3, iterations=1, warmup_rounds=0), N=n_tokens, d=d, n_latents=n)


@pytest.mark.parametrize("variant", ["blocked", "dense"])
@pytest.mark.parametrize("shape", SIM_SHAPES[bench_size()], ids=lambda s: "n{}-d{}".format(*s))
def test_max_cosine(benchmark, shape, variant):
    n, d = shape
    if variant == "dense" and n > DENSE_SIM_LIMIT:
        pytest.skip(f"the dense [n, n] matrix takes {n * n * 4 / 1e9:.1f} GB")
    torch.manual_seed(0)
    W = torch.randn(n, d, device=DEVICE)
    if HAS_CUDA:
        torch.backends.cuda.matmul.allow_tf32 = True

    def step():
        if variant == "blocked":
            return max_cosine_similarity(W)
        unit = W / W.norm(dim=1, keepdim=True)
        sims = unit @ unit.T
        sims.fill_diagonal_(float("-inf"))
        return sims.max(dim=1)

    big = n > 20_000
    if not big:
        step()
    measure(benchmark, step, op="max_cosine", shape=f"n={n} d={d}", variant=variant, passes="fwd",
            dtype="tf32" if HAS_CUDA else torch.float32, flops=n * (n - 1) * d, bytes_=None, triton=False,
            pedantic=dict(rounds=1 if big else 3, iterations=1, warmup_rounds=0), n_latents=n, d=d)
