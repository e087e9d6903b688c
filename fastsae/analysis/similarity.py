"""Cosine similarity between dictionary directions, in blocks: the n x n matrix never exists.

    values, ids = max_cosine_similarity(W_dec[alive])            # each direction's nearest other one
    values, ids = max_cosine_similarity(W_e2e[alive_e2e], W_local[alive_local])   # ... in another SAE
    values, ids = nearest_latents(W, k=10)                        # the 10 nearest, largest first

The paper's definitions (e2e_sae scripts/analysis/geometric_analysis.py): the dictionary elements
are the decoder directions of the alive latents, each normalised to unit length; within one SAE,
each element's largest cosine similarity with another element of the same SAE (itself excluded);
across two SAEs A and B, each element of A's largest cosine similarity with any element of B.

How: rows are normalised once (fp32), then blocks of ``block`` x ``block`` similarities are
multiplied and folded into a running top-k per row. Within one dictionary only the blocks on and
above the diagonal are multiplied, each feeding the top-k of its rows and of its columns (half
the FLOPs). Memory: the two normalised copies (n x d), one block, the running top-k (n x k),
whatever n is; time: n_a * n_b * d multiply-adds (half that within one dictionary).

Precision (``precision``): "fp32" multiplies fp32 directions exactly as torch's fp32 GEMM does;
"tf32" (the default on CUDA) lets the GEMM round its operands to TF32 (10 explicit mantissa bits)
on tensor cores; "bf16" casts the unit directions to bfloat16 (round to nearest) and multiplies
them (fp32 accumulation, a bf16 result). A cosine of two unit vectors changes by at most
sum_i |a_i b_i| <= 1 times the relative operand error (2 ulp: 2^-9 for TF32, counting a truncating
conversion; 2^-7 for bf16), plus fp32 accumulation (d * 2^-24) and, for bf16, the result's rounding
(2^-8); the max over a row moves by at most the largest change of its entries. So every reported
maximum is within ``max_error_bound(precision, d)`` of the exact one: about 2.1e-3 for TF32 and
1.2e-2 for bf16 at d = 768, against histogram bins of 0.02; the nearest latent's id may differ
where two candidates lie closer than that. On CPU "auto" is fp32 (TF32 does not exist there).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
DEFAULT_BLOCK = 2048


def max_error_bound(precision: str, d: int) -> float:
    """The largest error of a cosine similarity (and so of a max over them) at ``precision`` and
    width ``d`` (see the module docstring); "fp32" gets the accumulation and normalisation terms."""
    accumulate = d * 2.0 ** -24 + 4 * 2.0 ** -24
    operands = {"fp32": 0.0, "tf32": 2.0 ** -9 + 2.0 ** -20, "bf16": 2.0 ** -7 + 2.0 ** -16 + 2.0 ** -8}
    if precision not in operands:
        raise ValueError(f"precision must be one of {tuple(operands)}, got {precision!r}")
    return operands[precision] + accumulate


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    return precision


@contextlib.contextmanager
def _matmul_mode(precision: str, device: torch.device):
    """TF32 on for "tf32", off for "fp32", for CUDA GEMMs in the block; the old setting restored."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def unit_rows(directions: torch.Tensor) -> torch.Tensor:
    """Copy of ``directions`` [n, d] (fp32, or fp64 if it is fp64) with each row scaled to unit norm
    (a zero row stays 0)."""
    x = directions.detach()
    x = x if x.dtype == torch.float64 else x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _fold(top_values, top_ids, block, offset, k):
    """Merge a block of similarities [rows, cols] (columns offset..) into the running top-k of its rows."""
    if k == 1:
        values, ids = block.max(dim=1)
        better = values > top_values[:, 0]
        top_values[:, 0] = torch.where(better, values, top_values[:, 0])
        top_ids[:, 0] = torch.where(better, ids + offset, top_ids[:, 0])
        return
    values, ids = block.topk(min(k, block.shape[1]), dim=1)
    values = torch.cat([top_values, values], dim=1)
    ids = torch.cat([top_ids, ids + offset], dim=1)
    best_values, order = values.topk(k, dim=1)
    top_values.copy_(best_values)
    top_ids.copy_(ids.gather(1, order))


@torch.no_grad()
def nearest_latents(a: torch.Tensor, b: torch.Tensor | None = None, *, k: int = 1, block: int = DEFAULT_BLOCK,
                    precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a`` [n_a, d], its ``k`` largest cosine similarities with the rows of
    ``b`` [n_b, d] (None: with the other rows of a, each row's own excluded), largest first.

    Returns (values float32 [n_a, k], ids int64 [n_a, k]) on a's device; ids index b's rows
    (a's, when b is None). Where fewer than k candidates exist the rest are -inf with id -1.
    """
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"a must be a non-empty [n, d] matrix of directions, got shape {tuple(a.shape)}")
    if b is not None and (b.ndim != 2 or b.shape[0] == 0 or b.shape[1] != a.shape[1]):
        raise ValueError(f"b must be a non-empty [n, d={a.shape[1]}] matrix of directions, got shape {tuple(b.shape)}")
    if b is not None and b.device != a.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    precision = resolve_precision(precision, a.device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    within = b is None
    a_unit = unit_rows(a).to(dtype)
    b_unit = a_unit if within else unit_rows(b).to(dtype)
    n_a, n_b = a_unit.shape[0], b_unit.shape[0]
    top_values = torch.full((n_a, k), float("-inf"), device=a.device)
    top_ids = torch.full((n_a, k), -1, dtype=torch.int64, device=a.device)
    with _matmul_mode(precision, a.device):
        for i0 in range(0, n_a, block):
            rows = a_unit[i0:i0 + block]
            for j0 in range(i0 if within else 0, n_b, block):
                sims = (rows @ b_unit[j0:j0 + block].T).float()
                if within and j0 == i0:
                    sims.fill_diagonal_(float("-inf"))  # a direction is not its own neighbour
                _fold(top_values[i0:i0 + block], top_ids[i0:i0 + block], sims, j0, k)
                if within and j0 != i0:  # the block below the diagonal is this one transposed
                    _fold(top_values[j0:j0 + block], top_ids[j0:j0 + block], sims.T, i0, k)
    top_ids.masked_fill_(top_values == float("-inf"), -1)
    return top_values, top_ids


def max_cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None, *, block: int = DEFAULT_BLOCK,
                          precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [n_a], ids int64 [n_a]): each row of a's largest cosine similarity with a row
    of b (None: with another row of a) and that row's index. See nearest_latents."""
    if b is None and a.shape[0] < 2:
        raise ValueError("within one dictionary the max similarity needs at least 2 directions")
    values, ids = nearest_latents(a, b, k=1, block=block, precision=precision)
    return values[:, 0], ids[:, 0]


def decoder_directions(sae, latents: torch.Tensor | None = None) -> torch.Tensor:
    """The SAE's decoder directions W_dec[latents] [n, d_out] (all latents for None; d_out = d_in for
    an SAE, the width a transcoder writes for one), as stored:
    the similarities normalise them (the forward pass's per-row scale does not change a direction)."""
    W = sae.W_dec.detach()
    return W if latents is None else W[latents.to(W.device)]


# ---------------------------------------------------------------------------- confidence intervals

def _resampled_means(sample: np.ndarray, n_resamples: int, rng: np.random.Generator, chunk: int = 64) -> np.ndarray:
    """Means of n_resamples bootstrap resamples (with replacement) of ``sample``, chunk by chunk."""
    out = np.empty(n_resamples)
    n = len(sample)
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        out[start:start + m] = sample[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return out


def bootstrap_mean_ci(sample, *, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0) -> dict:
    """{mean, low, high}: the sample mean and its percentile-bootstrap confidence interval."""
    sample = np.asarray(sample, dtype=np.float64).ravel()
    if sample.size == 0:
        raise ValueError("bootstrap of an empty sample")
    means = _resampled_means(sample, n_resamples, np.random.default_rng(seed))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(sample.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "n": int(sample.size), "n_resamples": n_resamples}


def bootstrap_mean_difference_ci(sample_a, sample_b, *, confidence: float = 0.95, n_resamples: int = 1000,
                                 seed: int = 0) -> dict:
    """{difference, low, high}: mean(a) - mean(b) and its bootstrap confidence interval, each
    sample resampled on its own, as the paper's code (scipy.stats.bootstrap of the mean difference,
    1,000 resamples; scipy's default interval is BCa, this one the percentile interval)."""
    a = np.asarray(sample_a, dtype=np.float64).ravel()
    b = np.asarray(sample_b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    diffs = _resampled_means(a, n_resamples, rng) - _resampled_means(b, n_resamples, rng)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"difference": float(a.mean() - b.mean()), "low": float(low), "high": float(high),
            "confidence": confidence, "n_a": int(a.size), "n_b": int(b.size), "n_resamples": n_resamples}


def histogram(values, bins: int = 50, value_range: tuple[float, float] = (-1.0, 1.0)) -> dict:
    """{edges, counts}: a fixed-range histogram as plain lists (for the JSON and the figures)."""
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=value_range)
    return {"edges": edges.tolist(), "counts": counts.tolist()}
