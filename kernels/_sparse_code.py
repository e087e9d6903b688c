"""Kernels on a sparse code that several ops share, with their launchers.

A sparse code is (values [N, k], indices [N, k]): TopK's, or a ReLU code compacted into k = C
slots per row (compact_active; the rows that do not fit are DenseRows, handled by tensor-core
tiles inside the same kernels). Each op's file (kernels/<op>.py) uses these and imports nothing
from another op's file:

- `gather_latents_kernel`: grad_x[t] = sum_j grad[t, j] * W_enc[:, idx[t, j]], the encoders'
  input gradient (TopK, ReLU, ReLU autoencoder).
- `latent_segment_grad_kernel` (latent_segment_grad, sort_entries_by_latent): the entries sorted
  by latent, each block of latents reduced as one tensor-core product, for grad_W_enc /
  grad_b_enc (the encoders) and grad_W_dec (the dense-code decoder); sparse_encoder_backward
  puts the gather and the reduction together.
- `compact_active_kernel` (compact_active): a dense ReLU code into the capacity-bounded one.
- `sparse_decode_fwd_kernel` (sparse_decode_forward): x_hat = sum_j values[:, j] *
  W_dec[indices[:, j]] + b_dec, the sparse decoder's forward and the ReLU autoencoder's decode.

The design of each (why a segmented reduction and not atomics, why W_enc is read latent-major)
is told where the op is: kernels/topk_encoder.py and kernels/sparse_decoder.py.

This file is longer than the house's ~400 lines because it holds the four shared kernels with
their launchers and configs, each used by two or three ops.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import matmul_mode, mma
from fastsae.kernels._tiles import accumulate_latent_segment


# --------------------------------------------------------------------------------------------
# The encoders' backward: gather for grad_x, segmented reduction by latent for grad_W / grad_b
# --------------------------------------------------------------------------------------------


@triton.jit
def gather_latents_kernel(
    grad_ptr, idx_ptr, w_ptr, out_ptr, count_ptr, dense_grad_ptr, acts_ptr,
    n_tokens, d_in, k, n_latents,
    stride_wd, stride_wn, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_COUNTS: tl.constexpr, HAS_DENSE_ROWS: tl.constexpr, MATMUL_MODE: tl.constexpr,
):
    """out[t, :] = sum_j grad[t, j] * W[:, idx[t, j]]; grad, idx: [N, k] contiguous; fp32 sum.

    With W_enc stored [n_latents, d_in] (E2ESAE's layout: stride_wd == 1, a constant after the
    launch's specialisation), each latent's BLOCK_D weights are one contiguous, vectorised read
    (16-byte loads when stride_wn is 16-divisible): a token's k latents cost k row reads, not
    k * BLOCK_D scattered 32-byte sectors as with a column of a [d_in, n_latents] matrix.

    Every entry of the code is read, a zero gradient too: 0 * W is not skipped, so a non-finite
    weight gives NaN as the reference's product does (skipping zeros hid an inf in W_enc).

    ROW_COUNTS (a capacity-bounded code): count[t] is row t's number of entries, in its first
    count[t] slots (the rest is padding, never read). HAS_DENSE_ROWS (with ROW_COUNTS; the ReLU
    encoder's code, see DenseRows): a row with count[t] > k did not fit and is computed densely,
    out[t] = (grad_dense[t] * (acts[t] > 0)) @ W^T, by tensor-core tiles over all latents, chosen
    per row block on the device (no host sync); without it, dense_grad and acts may be None.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_tokens
    d_ok = ds < d_in
    # int64 offsets: N * k (the ReLU path's k is its capacity) and N * d_in pass 2^31 at scale.
    rows64 = rows.to(tl.int64)
    code = rows64 * k
    w_cols = w_ptr + ds[None, :].to(tl.int64) * stride_wd
    if ROW_COUNTS:
        count = tl.load(count_ptr + rows, mask=row_ok, other=0)
        dense_row = row_ok & (count > k)
        row_slots = tl.where(row_ok & (count <= k), count, 0)
        n_slots = tl.max(row_slots, axis=0)  # the block's widest compact row
    else:
        row_slots = tl.where(row_ok, k, 0)
        n_slots = k
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_slots):
        live = j < row_slots
        latent = tl.load(idx_ptr + code + j, mask=live, other=0).to(tl.int64)
        weight = tl.load(grad_ptr + code + j, mask=live, other=0.0).to(tl.float32)
        w_row = tl.load(w_cols + latent[:, None] * stride_wn, mask=live[:, None] & d_ok[None, :], other=0.0)
        acc += weight[:, None] * w_row.to(tl.float32)
    if HAS_DENSE_ROWS:
        if tl.max(dense_row.to(tl.int32), axis=0) > 0:
            offs_n = tl.arange(0, BLOCK_N)
            for n_start in range(0, n_latents, BLOCK_N):
                lats = n_start + offs_n
                lat_ok = lats < n_latents
                lats64 = lats.to(tl.int64)
                tile_ok = dense_row[:, None] & lat_ok[None, :]
                acts = tl.load(acts_ptr + rows64[:, None] * n_latents + lats64[None, :], mask=tile_ok, other=0.0)
                grad = tl.load(dense_grad_ptr + rows64[:, None] * stride_gm + lats64[None, :] * stride_gn,
                               mask=tile_ok & (acts > 0), other=0.0)
                w_t = tl.load(w_cols + lats64[:, None] * stride_wn, mask=lat_ok[:, None] & d_ok[None, :], other=0.0)
                acc = mma(grad.to(w_t.dtype), w_t, acc, MATMUL_MODE)
    tl.store(out_ptr + rows64[:, None] * d_in + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def latent_segment_grad_kernel(
    x_ptr, tok_ptr, lat_ptr, grad_ptr, block_start_ptr, grad_w_ptr, grad_b_ptr,
    dense_rows_ptr, n_dense_rows_ptr, dense_grad_ptr, acts_ptr,
    d_in, n_latents,
    stride_xm, stride_xd, stride_gwd, stride_gwn, stride_gm, stride_gn,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    MATMUL_MODE: tl.constexpr, WRITE_BIAS: tl.constexpr, HAS_DENSE_ROWS: tl.constexpr,
    DENSE_MASKED: tl.constexpr,
):
    """grad_W[:, l] = sum over entries e of latent l of grad[e] * x[tok[e]]; grad_b[l] = sum grad[e].

    Entries are sorted by latent; block_start[i] is the first entry of latent block i
    (accumulate_latent_segment). With grad_W in W_enc's [n_latents, d_in] storage
    (stride_gwd == 1) every latent's row of the tile is one contiguous store.

    HAS_DENSE_ROWS: the rows dense_rows[:n_dense_rows] (a device count) add their dense gradient
    [rows, latents]^T @ x[rows] by the same tensor-core product, in the same fp32 accumulator (so
    a 16-bit grad_W is rounded once): (grad_dense * (acts > 0)) for the ReLU encoder
    (DENSE_MASKED), grad_dense as it is for the dense decoder (x = grad_out, grad_dense = the code).
    """
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    latent0 = pid_l * BLOCK_L
    lats = latent0 + tl.arange(0, BLOCK_L)
    l_ok = lats < n_latents
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ds64 = ds.to(tl.int64)
    d_ok = ds < d_in
    entry_start = tl.load(block_start_ptr + pid_l)
    entry_end = tl.load(block_start_ptr + pid_l + 1)

    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc, bias_acc = accumulate_latent_segment(acc, bias_acc, x_ptr, tok_ptr, lat_ptr, grad_ptr, entry_start,
                                              entry_end, latent0, ds64, d_ok, stride_xm, stride_xd,
                                              BLOCK_L, BLOCK_E, MATMUL_MODE, WRITE_BIAS)
    if HAS_DENSE_ROWS:
        n_dense = tl.load(n_dense_rows_ptr)
        lats64 = lats.to(tl.int64)
        for r_start in range(0, n_dense, BLOCK_E):
            rs = r_start + tl.arange(0, BLOCK_E)
            r_ok = rs < n_dense
            row = tl.load(dense_rows_ptr + rs, mask=r_ok, other=0).to(tl.int64)
            tile_ok = l_ok[:, None] & r_ok[None, :]
            if DENSE_MASKED:
                acts_t = tl.load(acts_ptr + row[None, :] * n_latents + lats64[:, None], mask=tile_ok, other=0.0)
                tile_ok = tile_ok & (acts_t > 0)
            grad_t = tl.load(dense_grad_ptr + row[None, :] * stride_gm + lats64[:, None] * stride_gn,
                             mask=tile_ok, other=0.0)
            x_rows = tl.load(x_ptr + row[:, None] * stride_xm + ds64[None, :] * stride_xd,
                             mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            grad_t = grad_t.to(x_rows.dtype)  # the gradient in x's dtype, as the compact entries are
            acc = mma(grad_t, x_rows, acc, MATMUL_MODE)
            if WRITE_BIAS:
                bias_acc += tl.sum(grad_t.to(tl.float32), axis=1)

    tl.store(grad_w_ptr + lats.to(tl.int64)[:, None] * stride_gwn + ds64[None, :] * stride_gwd,
             acc.to(grad_w_ptr.dtype.element_ty), mask=l_ok[:, None] & d_ok[None, :])
    if WRITE_BIAS:
        if pid_d == 0:
            tl.store(grad_b_ptr + lats, bias_acc.to(grad_b_ptr.dtype.element_ty), mask=l_ok)


class DenseRows(NamedTuple):
    """The rows of a capacity-bounded ReLU code that did not fit (compact_active below).

    The code is (values [N, C], indices [N, C]) with count[t] active latents in row t; a row with
    count[t] > C keeps no usable compact entries and takes its gradient from the dense tensors.
    """

    count: torch.Tensor  # [N] int32: active latents per row
    rows: torch.Tensor  # [N] int32: row ids, the dense rows (count > C) first
    n_rows: torch.Tensor  # [1] int32: how many dense rows (on the device: never read by the host)
    grad: torch.Tensor  # [N, n_latents], any strides: the gradient with respect to the code
    acts: torch.Tensor  # [N, n_latents] contiguous: active where > 0

    def grad_strides(self) -> dict:
        """The kernels' stride_gm / stride_gn of the dense gradient (0 without one)."""
        if self.grad is None:
            return dict(stride_gm=0, stride_gn=0)
        return dict(stride_gm=self.grad.stride(0), stride_gn=self.grad.stride(1))


# No dense rows: the kernels launched with HAS_DENSE_ROWS=False read none of these pointers, so
# they are passed as None (a launch specialises None to a constant) rather than dummy tensors.
NO_DENSE_ROWS = DenseRows(count=None, rows=None, n_rows=None, grad=None, acts=None)


# (BLOCK_M, BLOCK_D, BLOCK_N (latents per step of the dense rows), num_warps) of the gather; (BLOCK_L, BLOCK_D, BLOCK_E, num_warps, num_stages)
# of the segmented reduction. Their compile facts: tests/compile_check.py.
GATHER_CONFIG = dict(BLOCK_M=32, BLOCK_D=128, BLOCK_N=32, num_warps=4)
SEGMENT_CONFIG = dict(BLOCK_L=64, BLOCK_D=128, BLOCK_E=32, num_warps=4)
SEGMENT_NUM_STAGES = 3


def segment_config(mode: str, dense_rows: bool = False) -> dict:
    """SEGMENT_CONFIG, with half the columns and half the entries per step for full-fp32 FMAs
    ("ieee": the dot unrolls over the entries with both operand tiles in registers; the ReLU
    variant spilled 88 B on sm_80 at 128 columns and 32 entries). With dense rows (the ReLU
    encoder, dense_decode), reading a stride-0 gradient (autograd's for acts.sum()) spilled 8 B
    on sm_80: 16 entries per step there, and 8 warps for "ieee". BLOCK_L, which the entries'
    sort uses, is the same in every config."""
    config = dict(SEGMENT_CONFIG, BLOCK_D=64, BLOCK_E=16) if mode == "ieee" else dict(SEGMENT_CONFIG)
    if dense_rows:
        config.update(num_warps=8) if mode == "ieee" else config.update(BLOCK_E=16)
    return config


def sparse_encoder_backward(grad_pre: torch.Tensor, indices: torch.Tensor, x: torch.Tensor,
                            W_enc: torch.Tensor, need_x: bool, need_w: bool, need_b: bool,
                            dense_rows: DenseRows | None = None):
    """Gradients of an encoder whose code is (grad_pre [N, k], indices [N, k]) sparse.

    grad_pre is the gradient with respect to the selected pre-activations, already masked, in x's
    dtype. Returns (grad_x, grad_W_enc, grad_b_enc); None for those not needed. grad_W_enc has
    W_enc's strides where W_enc is dense (E2ESAE's [n_latents, d_in] storage gives a transposed
    grad, which autograd accumulates into W_enc.grad without a copy). ``dense_rows``: the ReLU
    encoder's rows that overflowed their k slots (see DenseRows); their entries in grad_pre /
    indices are ignored. Nothing here reads a device value back to the host.
    """
    n_tokens, k = indices.shape
    d_in, n_latents = W_enc.shape
    if n_tokens * k >= 2**31:
        raise ValueError(f"sparse_encoder_backward: N*k = {n_tokens * k} entries exceeds the int32 entry ids")
    if n_tokens * k == 0:  # an empty batch (or code): empty grad_x, zero grad_W_enc / grad_b_enc
        return (torch.zeros(n_tokens, d_in, dtype=x.dtype, device=x.device) if need_x else None,
                torch.zeros_like(W_enc) if need_w else None,
                torch.zeros(n_latents, dtype=W_enc.dtype, device=x.device) if need_b else None)
    grad_pre = grad_pre.contiguous()
    indices = indices.contiguous()
    grad_x = grad_w = grad_b = None
    mode = matmul_mode(x.dtype)
    dense = dense_rows or NO_DENSE_ROWS

    if need_x:
        grad_x = torch.empty(n_tokens, d_in, dtype=x.dtype, device=x.device)
        cfg = GATHER_CONFIG
        grid = (triton.cdiv(n_tokens, cfg["BLOCK_M"]), triton.cdiv(d_in, cfg["BLOCK_D"]))
        gather_latents_kernel[grid](
            grad_ptr=grad_pre, idx_ptr=indices, w_ptr=W_enc, out_ptr=grad_x,
            count_ptr=dense.count, dense_grad_ptr=dense.grad, acts_ptr=dense.acts,
            n_tokens=n_tokens, d_in=d_in, k=k, n_latents=n_latents,
            stride_wd=W_enc.stride(0), stride_wn=W_enc.stride(1), **dense.grad_strides(),
            ROW_COUNTS=dense_rows is not None, HAS_DENSE_ROWS=dense_rows is not None, MATMUL_MODE=mode, **cfg)

    if need_w or need_b:
        cfg = segment_config(mode)
        skip = None if dense_rows is None else dense_rows.count > k  # their entries are partial
        entries = sort_entries_by_latent(indices, n_latents, cfg["BLOCK_L"], skip_rows=skip)
        # grad_W is written straight in W_enc's dtype and layout from the fp32 accumulator
        # (empty_like keeps the strides of a dense tensor, else gives a contiguous one).
        grad_w = torch.empty_like(W_enc, memory_format=torch.preserve_format) if need_w else None
        grad_b = torch.empty(n_latents, dtype=W_enc.dtype, device=x.device) if need_b else None
        latent_segment_grad(x, entries, grad_pre.reshape(-1)[entries.order], n_latents, mode,
                            grad_w=grad_w, grad_w_strides=None if grad_w is None else (grad_w.stride(1), grad_w.stride(0)),
                            grad_b=grad_b, dense_rows=dense_rows, dense_masked=True)
    return grad_x, grad_w, grad_b


INT32_MAX = torch.iinfo(torch.int32).max


class SortedEntries(NamedTuple):
    """The entries (t, j) of an [N, k] code sorted by latent, for the segmented reductions."""

    order: torch.Tensor  # [N*k] int64: flat entry ids t * k + j, sorted by latent (stable: token order)
    tokens: torch.Tensor  # [N*k] int32: each entry's token
    latents: torch.Tensor  # [N*k] int32: the sorted latents; skipped entries are INT32_MAX, past every block
    block_start: torch.Tensor  # [n_blocks + 1] int32: latent block i owns entries [block_start[i], block_start[i+1])


def nonfinite_rows(rows: torch.Tensor) -> torch.Tensor:
    """bool [N]: rows holding a NaN or an inf (or summing past fp32's range, which is harmless: such
    a row only takes the exact per-entry path). One reduction, no [N, d] temporary."""
    return ~torch.isfinite(rows.sum(1, dtype=torch.float32))


def sort_entries_by_latent(indices: torch.Tensor, n_latents: int, block_l: int,
                           skip_rows: torch.Tensor | None = None) -> SortedEntries:
    """Sort the N*k entries of ``indices`` by latent, on the device (no host sync).

    skip_rows: bool [N], rows whose entries are left out (moved past the last block); entries
    whose index is already INT32_MAX (a padded ReLU code) sort there too.
    """
    n_tokens, k = indices.shape
    flat = indices if skip_rows is None else torch.where(skip_rows[:, None], INT32_MAX, indices)
    sorted_latents, order = torch.sort(flat.reshape(-1), stable=True)
    sorted_latents = sorted_latents.to(torch.int32)
    n_blocks = triton.cdiv(n_latents, block_l)
    boundaries = torch.arange(0, (n_blocks + 1) * block_l, block_l, device=indices.device, dtype=torch.int32)
    block_start = torch.searchsorted(sorted_latents, boundaries).to(torch.int32)
    return SortedEntries(order, (order // k).to(torch.int32), sorted_latents, block_start)


def marked_tokens(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The entries' tokens as accumulate_latent_segment reads them: -1 - token where the row of
    ``rows`` (the dense operand the reduction gathers per entry) is not finite."""
    return torch.where(nonfinite_rows(rows)[tokens], -1 - tokens, tokens)


def latent_segment_grad(rows: torch.Tensor, entries: SortedEntries, sorted_weights: torch.Tensor, n_latents: int,
                        mode: str, *, grad_w: torch.Tensor | None, grad_w_strides: tuple[int, int] | None,
                        grad_b: torch.Tensor | None, dense_rows: DenseRows | None = None,
                        dense_masked: bool = True) -> None:
    """Fill grad_w[l] = sum over entries e of latent l of weight[e] * rows[tok[e]] (grad_w_strides:
    its (latent, column) strides) and grad_b[l] = sum of weight[e], with latent_segment_grad_kernel.

    sorted_weights [N*k] in rows' dtype, in entries' order. dense_rows: rows that add their dense
    code (see DenseRows; masked by acts > 0 with dense_masked, else taken as they are).
    """
    cfg = segment_config(mode, dense_rows=dense_rows is not None)
    d = rows.shape[1]
    device = rows.device
    n_blocks = entries.block_start.numel() - 1
    # Without a weight gradient, one program per latent block covers d (the bias needs no rows).
    d_blocks = triton.cdiv(d, cfg["BLOCK_D"]) if grad_w is not None else 1
    # The kernel always stores its weight tile: without a weight gradient, into a 1 x 1 scratch at
    # d = 0 (every column masked off).
    scratch = grad_w if grad_w is not None else torch.empty(1, 1, dtype=rows.dtype, device=device)
    stride_gwn, stride_gwd = grad_w_strides if grad_w is not None else (0, 0)
    dense = dense_rows or NO_DENSE_ROWS
    latent_segment_grad_kernel[(n_blocks, d_blocks)](
        x_ptr=rows, tok_ptr=marked_tokens(entries.tokens, rows), lat_ptr=entries.latents, grad_ptr=sorted_weights,
        block_start_ptr=entries.block_start, grad_w_ptr=scratch, grad_b_ptr=grad_b,
        dense_rows_ptr=dense.rows, n_dense_rows_ptr=dense.n_rows, dense_grad_ptr=dense.grad, acts_ptr=dense.acts,
        d_in=d if grad_w is not None else 0, n_latents=n_latents,
        stride_xm=rows.stride(0), stride_xd=rows.stride(1), stride_gwd=stride_gwd, stride_gwn=stride_gwn,
        **dense.grad_strides(),
        MATMUL_MODE=mode, WRITE_BIAS=grad_b is not None, HAS_DENSE_ROWS=dense_rows is not None,
        DENSE_MASKED=dense_masked, num_stages=SEGMENT_NUM_STAGES, **cfg,
    )



# --------------------------------------------------------------------------------------------
# A dense ReLU code, compacted into C slots per row
# --------------------------------------------------------------------------------------------

# Slots per row of the sparse backward's compact code: C = clamp(n / 256, 64, n), a multiple of
# 16. e2e ReLU SAEs run at L0 / n ~ 1/1000 (the paper: L0 27 to 69 of 46,080 latents), so C = 192
# at n = 46,080 leaves rows 3x the typical L0 on the compact path; wider rows take the dense
# per-row path. The compact code costs 6 bytes per slot (16-bit value + int32 index): 18 MiB
# at 16,384 tokens, against 1.4 GiB for one [N, n] bf16 tensor.
SPARSE_CAPACITY_FRACTION = 1 / 256
SPARSE_MIN_CAPACITY = 64


def sparse_capacity(n_latents: int) -> int:
    """C, the slots per row of the sparse backward's compact code (see above)."""
    capacity = max(SPARSE_MIN_CAPACITY, triton.cdiv(int(n_latents * SPARSE_CAPACITY_FRACTION), 16) * 16)
    return max(1, min(n_latents, capacity))


@triton.jit
def compact_active_kernel(
    grad_ptr, acts_ptr, val_ptr, idx_ptr, count_ptr,
    n_tokens, n_latents, capacity, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NONZERO: tl.constexpr,
):
    """Each row's active entries (acts > 0, or acts != 0 with NONZERO), in latent order, into
    capacity-bounded slots.

    val[t, :C] = grad[t, l] and idx[t, :C] = l for the first C active latents l of row t;
    count[t] = all of the row's active latents (> C: the row did not fit and is handled densely).
    Slots past the count keep what the launcher put there (value 0 and a padding index). acts is
    [N, n] contiguous; grad any strides, read only where active.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    rows64 = rows.to(tl.int64)
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n_start in range(0, n_latents, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        in_range = row_ok[:, None] & (cols < n_latents)[None, :]
        acts = tl.load(acts_ptr + rows64[:, None] * n_latents + cols[None, :], mask=in_range, other=0.0)
        active = in_range & ((acts != 0) if NONZERO else (acts > 0))
        # Slot of each active entry: the row's count so far plus its rank within this chunk.
        slot = count[:, None] + tl.cumsum(active.to(tl.int32), axis=1) - 1
        keep = active & (slot < capacity)
        grad = tl.load(grad_ptr + rows64[:, None] * stride_gm + cols.to(tl.int64)[None, :] * stride_gn,
                       mask=keep, other=0.0)
        out = rows64[:, None] * capacity + slot
        tl.store(val_ptr + out, grad.to(val_ptr.dtype.element_ty), mask=keep)
        tl.store(idx_ptr + out, cols[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32), mask=keep)
        count += tl.sum(active.to(tl.int32), axis=1)
    tl.store(count_ptr + rows, count, mask=row_ok)


# [BLOCK_M, BLOCK_N] of the compaction: each warp reads 2 rows of 256 contiguous elements a step.
COMPACT_CONFIG = dict(BLOCK_M=8, BLOCK_N=256, num_warps=4)


def compact_active(grad_acts: torch.Tensor, acts: torch.Tensor, capacity: int, *,
                   nonzero: bool = False) -> tuple[torch.Tensor, torch.Tensor, DenseRows]:
    """A capacity-bounded code: (values [N, C] in acts' dtype, indices [N, C] int32, DenseRows).

    values / indices hold each row's active entries of grad_acts (where acts > 0, or acts != 0
    with ``nonzero``), in its first count slots, padded with value 0 at latent INT32_MAX (past
    every latent block of the segmented reductions); rows with more than C active latents are
    named by the DenseRows (count, the dense rows first, their number), all on the device.
    """
    acts = acts.contiguous()  # the forward's output: already contiguous, no copy
    n_tokens, n_latents = acts.shape
    values = torch.zeros(n_tokens, capacity, dtype=acts.dtype, device=acts.device)
    indices = torch.full((n_tokens, capacity), torch.iinfo(torch.int32).max, dtype=torch.int32, device=acts.device)
    count = torch.empty(n_tokens, dtype=torch.int32, device=acts.device)
    cfg = dict(COMPACT_CONFIG)
    if n_tokens:
        compact_active_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_M"]),)](
            grad_acts, acts, values, indices, count, n_tokens, n_latents, capacity,
            grad_acts.stride(0), grad_acts.stride(1), NONZERO=nonzero, **cfg)
    dense = count > capacity
    # Dense rows first (a stable sort of the 0/1 flags, on the device), and their number.
    rows = torch.sort(dense.to(torch.uint8), descending=True, stable=True).indices.to(torch.int32)
    n_rows = dense.sum(dtype=torch.int32).reshape(1)
    return values, indices, DenseRows(count, rows, n_rows, grad_acts, acts)


# --------------------------------------------------------------------------------------------
# Decoding a sparse code (kernels/sparse_decoder.py has the launch configs' reasons)
# --------------------------------------------------------------------------------------------

FWD_BLOCK_T = 4  # tokens per forward program
FWD_K_UNROLL = 4  # slots gathered per loop step: independent loads in flight hide gather latency
MAX_BLOCK_D = 256
NUM_WARPS = 4


def block_d_for(d: int) -> int:
    """Columns per program: the whole row up to 256, else 256-wide column blocks."""
    return min(MAX_BLOCK_D, triton.next_power_of_2(d))


@triton.jit
def sparse_decode_fwd_kernel(
    values_ptr, indices_ptr, W_ptr, b_ptr, out_ptr,
    n_tokens, k, d, stride_w, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, K_UNROLL: tl.constexpr,
):
    """out[t, cols] = b[cols] + sum_j values[t, j] * W[indices[t, j], cols]; values/indices [N, k] contiguous."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < n_tokens
    col_ok = cols < d
    code_offsets = tokens.to(tl.int64) * k  # start of each token's k slots

    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, k, K_UNROLL):
        for u in tl.static_range(K_UNROLL):
            slot = j0 + u + tl.zeros([BLOCK_T], dtype=tl.int32)  # a tensor, so the mask stays int1
            slot_ok = token_ok & (slot < k)
            value = tl.load(values_ptr + code_offsets + slot, mask=slot_ok, other=0.0).to(tl.float32)
            latent = tl.load(indices_ptr + code_offsets + slot, mask=slot_ok, other=0).to(tl.int64)
            # A zero value contributes nothing: skip its row (saves the gather for the zero padding
            # of a compacted ReLU code, and for TopK codes whose k-th values are zero).
            row_ok = slot_ok & (value != 0.0)
            rows = tl.load(W_ptr + latent[:, None] * stride_w + cols[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += value[:, None] * rows.to(tl.float32)

    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc += bias[None, :]
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


def row_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride and columns by 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse_decode_forward(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                          b_dec: torch.Tensor) -> torch.Tensor:
    """x_hat [N, d_out] in W_dec's dtype (d_out = W_dec's columns). values/indices [N, k] (made contiguous here)."""
    values, indices = values.contiguous(), indices.contiguous()
    W_dec, b_dec = row_major(W_dec), b_dec.contiguous()
    n_tokens, k = values.shape
    d = W_dec.shape[1]
    out = torch.empty(n_tokens, d, dtype=W_dec.dtype, device=W_dec.device)
    block_d = block_d_for(d)
    grid = (triton.cdiv(n_tokens, FWD_BLOCK_T), triton.cdiv(d, block_d))
    sparse_decode_fwd_kernel[grid](
        values_ptr=values, indices_ptr=indices, W_ptr=W_dec, b_ptr=b_dec, out_ptr=out,
        n_tokens=n_tokens, k=k, d=d, stride_w=W_dec.stride(0), stride_out=out.stride(0),
        BLOCK_T=FWD_BLOCK_T, BLOCK_D=block_d, K_UNROLL=FWD_K_UNROLL, num_warps=NUM_WARPS,
    )
    return out
