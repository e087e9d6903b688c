"""Sparse-times-dense products shared by the reference ops, chunked over tokens.

A sparse code is a pair (weights [N, k], indices [N, k]) naming k rows of an [n, d] table per
token. The three products below are the whole of what a TopK encoder's backward and a sparse
decoder need; each builds at most a [chunk, k, d] temporary (never [N, k, d] or [N, n]) and
accumulates in fp32.
"""

from __future__ import annotations

import torch

from fastsae.ops.checks import chunk_rows


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the half types, the dtype itself for fp32 / fp64."""
    return torch.promote_types(dtype, torch.float32)


def gather_rows_weighted(weights: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * table[indices[t, j]]  -> [N, d] in table's dtype.

    ``table`` may be a strided view (the TopK backward passes W_enc.T).
    """
    n_tokens, k = indices.shape
    d = table.shape[1]
    out = torch.empty(n_tokens, d, dtype=table.dtype, device=table.device)
    acc = accumulation_dtype(table.dtype)
    step = chunk_rows(k * d)
    for start in range(0, n_tokens, step):
        idx = indices[start:start + step]
        rows = table.index_select(0, idx.reshape(-1)).view(idx.shape[0], k, d)
        w = weights[start:start + step].to(acc).unsqueeze(1)  # [chunk, 1, k]
        out[start:start + step] = torch.bmm(w, rows.to(acc)).squeeze(1).to(table.dtype)
    return out


def row_dots(dense: torch.Tensor, indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[t, j] = <dense[t], table[indices[t, j]]>  -> [N, k] in fp32 (fp64 for fp64 inputs)."""
    n_tokens, k = indices.shape
    d = table.shape[1]
    acc = accumulation_dtype(table.dtype)
    out = torch.empty(n_tokens, k, dtype=acc, device=table.device)
    step = chunk_rows(k * d)
    for start in range(0, n_tokens, step):
        idx = indices[start:start + step]
        rows = table.index_select(0, idx.reshape(-1)).view(idx.shape[0], k, d).to(acc)
        out[start:start + step] = torch.bmm(rows, dense[start:start + step].to(acc).unsqueeze(2)).squeeze(2)
    return out


def scatter_rows_weighted(weights: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor,
                          n_rows: int) -> torch.Tensor:
    """out[l] = sum over (t, j) with indices[t, j] == l of weights[t, j] * dense[t]  -> [n_rows, d].

    This is the weight gradient of a sparse product: a per-latent reduction, accumulated in fp32.
    """
    n_tokens, k = indices.shape
    d = dense.shape[1]
    acc = accumulation_dtype(dense.dtype)
    out = torch.zeros(n_rows, d, dtype=acc, device=dense.device)
    step = chunk_rows(k * d)
    for start in range(0, n_tokens, step):
        w = weights[start:start + step].to(acc)
        contributions = w.unsqueeze(2) * dense[start:start + step].to(acc).unsqueeze(1)  # [chunk, k, d]
        out.index_add_(0, indices[start:start + step].reshape(-1), contributions.reshape(-1, d))
    return out
