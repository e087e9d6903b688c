"""Sparse decoder: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec, fused in Triton.

Forward (`sparse_decode_fwd_kernel`, in kernels/_sparse_code.py since the ReLU autoencoder
decodes with it too): a gather. Each program owns a tile of BLOCK_T tokens x BLOCK_D output
columns and walks the k slots of its tokens, adding value * W_dec[latent, cols] into an fp32 tile; bias added once, one store. Traffic: N*k*d gathered W elements + N*d written.

Backward (`_sparse_decode_bwd_kernel`): both sparse products in one pass over the code sorted by
latent, never an N x k x d tensor:
    grad_W_dec[l]  = sum over pairs (t, j) with indices[t, j] == l of values[t, j] * grad_out[t]
    grad_values[t, j] = <grad_out[t], W_dec[indices[t, j]]>
A torch pre-pass sorts the N*k (token, slot) pairs by latent (a stable sort, then searchsorted
for each latent's first pair) so each latent's pairs form one segment; nothing in it reads a
value back to the host (torch.bincount would: on CUDA it syncs to read max(input) + 1, whatever
minlength says). One program per (latent, column block) walks its segment: it accumulates the
grad_W_dec row in fp32 and, because it already holds W_dec[l, cols], also emits the partial dot
products for grad_values. Every row
of grad_W_dec is written exactly once (zeros for untouched latents), so no memset, no atomics and
a deterministic result.

Why a segmented reduction and not fp32 atomics on grad_W_dec (the other design, OpenAI's
sparse_autoencoder): atomics need a zeroed fp32 buffer of n x d (one extra n*d write, plus an
n*d read + write to cast it when W_dec is bf16/fp16), N*k*d atomic adds that serialise on hot
latents, and they make the gradient run-to-run nondeterministic. At the issue's shapes n*d is the
biggest term of the whole backward (n = 131,072, d = 768: 400 MB in fp32), so paying it once is
what matters. The cost of the segmented form is load balance: a latent that fires on every token
is walked serially by d / BLOCK_D programs only. Atomics share that weakness (adds to one row
serialise); here the few busiest latents (more than HOT_LATENT_PAIRS pairs) leave the segments and
take two small dense fp32 GEMMs instead (see hot_latents_backward). No atomics in the kernels
(the hot path's scatter_add_ only ever adds zeros or writes a dropped column).

grad_values needs the dot over all d columns while the programs split d: each column block writes
its partial dots to a [d_blocks, N*k] fp32 buffer that torch sums afterwards (d_blocks = 3 at
d = 768; a few MB, deterministic).

dense_decode_triton: the ReLU SAE's decoder from a dense code acts [N, n]. The code is compacted
on the device into C slots per row (the ReLU encoder's compaction kernel) and goes through the
kernels above; rows with more than C nonzeros are decoded by tensor-core tiles over all latents
(`_dense_rows_decode_kernel`; their weight gradient in the TopK encoder's segmented reduction,
kernels/_sparse_code.py: latent_segment_grad). No host sync: nothing about the code
is read back to choose a path. See DenseDecodeSparseFunction for the gradient with respect to
acts, which must stay dense.

This file is longer than the house's ~400 lines because it is one op with forward, backward and
launchers together, for both codes it decodes (TopK's sparse code and a ReLU SAE's dense one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import matmul_mode, mma
from fastsae.kernels._sparse_code import (NUM_WARPS, DenseRows, block_d_for, compact_active, latent_segment_grad,
                                          row_major, segment_config, sort_entries_by_latent, sparse_capacity,
                                          sparse_decode_forward)
from fastsae.kernels._tiles import dense_row_block

# ---------------------------------------------------------------------------------------------
# Launch configuration (their compile facts: tests/compile_check.py).

# Chosen from the sm_90 compile reports (not yet timed on a GPU): a [4 tokens x 256 columns] tile
# on 4 warps gives each warp one token row and each thread 8 contiguous elements (16-byte loads in
# bf16); with 4 slots unrolled that is 64 registers, 8 programs (32 warps) per SM and 16 row
# gathers in flight per warp. [8 x 256] needed 143-168 registers (3 programs per SM). The
# backward steps over [8 pairs x 256 columns] for 4 unrolled latents: 80-88 registers; 16-pair
# steps cost more registers and, with most segments holding 1-2 pairs at n ~ N*k, would mostly
# be masked lanes.
BWD_BLOCK_P = 8  # (token, slot) pairs per step of a latent's segment
BWD_LATENTS_PER_PROGRAM = 4  # amortises program launch over the many empty latents of a wide dictionary

def bwd_block_d_for(d: int, dtype: torch.dtype) -> int:
    """The backward's columns per program: block_d_for(d), at most 128 for fp32 (the
    grad_W + grad_values variant spills 8 B at 256 fp32 columns on sm_90)."""
    return min(128, block_d_for(d)) if dtype == torch.float32 else block_d_for(d)


# ---------------------------------------------------------------------------------------------
# Kernels



@triton.jit
def _sparse_decode_bwd_kernel(
    grad_out_ptr, values_ptr, W_ptr, sorted_pairs_ptr, segment_start_ptr,
    grad_W_ptr, partial_dots_ptr,
    n_latents, k, d, n_pairs, stride_g, stride_w, stride_gw,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, LATENTS_PER_PROGRAM: tl.constexpr,
    WRITE_GRAD_W: tl.constexpr, WRITE_GRAD_VALUES: tl.constexpr,
):
    """Per latent l and column block: walk l's pairs (sorted_pairs[segment_start[l]:segment_start[l+1]],
    flat pair id p = t * k + j) and
      grad_W[l, cols] = sum_p values[p] * grad_out[t, cols]           (written for every l, fp32 sum)
      partial_dots[pid_d, p] = <grad_out[t, cols], W[l, cols]>          (summed over pid_d by the host)
    """
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    pair_lanes = tl.arange(0, BLOCK_P)

    # All segment bounds of this program's latents in one vector load, before any dependent load
    # (most segments hold 0-2 pairs, so the kernel is a chain of dependent loads: shorten it).
    # Past the last latent a segment is empty: no loads, and the grad_W store is masked.
    first_latent = pid_l * LATENTS_PER_PROGRAM
    lanes = tl.arange(0, LATENTS_PER_PROGRAM)
    lane_ok = first_latent + lanes < n_latents
    starts = tl.load(segment_start_ptr + first_latent + lanes, mask=lane_ok, other=0)
    ends = tl.load(segment_start_ptr + first_latent + lanes + 1, mask=lane_ok, other=0)
    # Unrolled, so the loads of different latents can be in flight together.
    for i in tl.static_range(LATENTS_PER_PROGRAM):
        latent = first_latent + i
        latent_ok = latent < n_latents
        start = tl.sum(tl.where(lanes == i, starts, 0))  # lane i as a scalar
        end = tl.sum(tl.where(lanes == i, ends, 0))
        # Scalar conditions enter masks as column limits (cols < limit), not as `mask & scalar`:
        # the interpreter mis-types a bool tensor and-ed with a broadcast scalar.
        if WRITE_GRAD_VALUES:
            w_row = tl.load(W_ptr + latent.to(tl.int64) * stride_w + cols,
                            mask=cols < tl.where(end > start, d, 0), other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            positions = p0 + pair_lanes
            pair_ok = positions < end
            pair = tl.load(sorted_pairs_ptr + positions, mask=pair_ok, other=0).to(tl.int64)
            token = pair // k
            g = tl.load(grad_out_ptr + token[:, None] * stride_g + cols[None, :],
                        mask=pair_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            if WRITE_GRAD_W:
                value = tl.load(values_ptr + pair, mask=pair_ok, other=0.0).to(tl.float32)
                acc += tl.sum(value[:, None] * g, axis=0)
            if WRITE_GRAD_VALUES:
                dots = tl.sum(g * w_row[None, :], axis=1)
                tl.store(partial_dots_ptr + pid_d.to(tl.int64) * n_pairs + pair, dots, mask=pair_ok)
        if WRITE_GRAD_W:
            tl.store(grad_W_ptr + latent.to(tl.int64) * stride_gw + cols,
                     acc.to(grad_W_ptr.dtype.element_ty), mask=cols < tl.where(latent_ok, d, 0))


# ---------------------------------------------------------------------------------------------
# Launchers



def sort_pairs_by_latent(indices: torch.Tensor, n_latents: int, skip: torch.Tensor | None = None):
    """Sort pre-pass: (sorted flat pair ids [N*k] int32, segment starts [n+1] int32), no host sync.

    The pairs of latent l are sorted_pairs[segment_start[l]:segment_start[l + 1]], in token order
    (stable sort, so the fp32 sums are deterministic). Pairs where ``skip`` is True are moved past
    the last segment, so no program visits them (used for the zero padding of a compacted code
    when only grad_W_dec is wanted).
    """
    flat = indices.reshape(-1)
    if skip is not None:
        flat = torch.where(skip.reshape(-1), torch.full_like(flat, n_latents), flat)
    sorted_latents, order = torch.sort(flat, stable=True)
    sorted_pairs = order.to(torch.int32)
    # segment_start[l] = pairs on latents below l: a binary search of the sorted latents, on the
    # device (no host sync, unlike torch.bincount on CUDA), exact and deterministic. Skipped pairs
    # (latent n_latents) sort last and lie past segment_start[n_latents].
    boundaries = torch.arange(n_latents + 1, device=indices.device, dtype=sorted_latents.dtype)
    segment_start = torch.searchsorted(sorted_latents, boundaries, out_int32=True)
    return sorted_pairs, segment_start


def sparse_decode_backward(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                           W_dec: torch.Tensor, *, need_grad_values: bool, need_grad_W: bool):
    """(grad_values [N, k] fp32 or None, grad_W_dec [n, d] in W_dec's dtype or None)."""
    grad_out, values, indices = grad_out.contiguous(), values.contiguous(), indices.contiguous()
    W_dec = row_major(W_dec)
    n_tokens, k = values.shape
    n_latents, d = W_dec.shape
    n_pairs = n_tokens * k
    if n_pairs >= 2**31:
        raise ValueError(f"sparse_decode: N*k = {n_pairs} pairs exceeds the int32 pair ids of the backward")
    device = W_dec.device
    hot = find_hot_latents(indices, n_latents) if n_pairs > HOT_LATENT_PAIRS else None
    sorted_pairs, segment_start = sort_pairs_by_latent(indices, n_latents,
                                                       skip=None if hot is None else hot.pair_is_hot)

    block_d = bwd_block_d_for(d, W_dec.dtype)
    d_blocks = triton.cdiv(d, block_d)
    # torch.empty: the kernel writes every row of grad_W (zeros where a latent has no pairs).
    grad_W = torch.empty(n_latents, d, dtype=W_dec.dtype, device=device) if need_grad_W else None
    partial_dots = (torch.empty(d_blocks, n_pairs, dtype=torch.float32, device=device)
                    if need_grad_values else None)
    grid = (triton.cdiv(n_latents, BWD_LATENTS_PER_PROGRAM), d_blocks)
    _sparse_decode_bwd_kernel[grid](  # an output not asked for is None: its WRITE_* flag is off
        grad_out_ptr=grad_out, values_ptr=values, W_ptr=W_dec, sorted_pairs_ptr=sorted_pairs,
        segment_start_ptr=segment_start, grad_W_ptr=grad_W, partial_dots_ptr=partial_dots,
        n_latents=n_latents, k=k, d=d, n_pairs=n_pairs, stride_g=grad_out.stride(0), stride_w=W_dec.stride(0),
        stride_gw=d if need_grad_W else 0,
        BLOCK_P=BWD_BLOCK_P, BLOCK_D=block_d, LATENTS_PER_PROGRAM=BWD_LATENTS_PER_PROGRAM,
        WRITE_GRAD_W=need_grad_W, WRITE_GRAD_VALUES=need_grad_values, num_warps=NUM_WARPS,
    )
    grad_values = None
    if need_grad_values:
        grad_values = (partial_dots[0] if d_blocks == 1 else partial_dots.sum(0)).view(n_tokens, k)
    if hot is not None:
        grad_values = hot_latents_backward(hot, grad_out, values, W_dec, grad_values, grad_W)
    return grad_values, grad_W


# Hot latents. The kernel walks a latent's segment serially (d / BLOCK_D programs, 8 pairs per
# dependent step), so one latent that fires on thousands of tokens would be the whole backward's
# tail: 4,096 pairs are 512 dependent steps, ~0.5 ms, against ~0.3 ms for everything else at the
# issue's shapes. Atomics would not fix that (they serialise on the same row). Instead the
# HOT_LATENT_SLOTS busiest latents, where longer than HOT_LATENT_PAIRS pairs, leave the segments
# and go through two small dense GEMMs in fp32 that use the whole GPU:
#   grad_W_dec[hot] = code_hot^T @ grad_out     code_hot = the code restricted to them, [N, H]
#   grad_values[pairs on hot latents] = (grad_out @ W_dec[hot]^T)[token, column of the latent]
# at 2 * 2 * N * H * d FLOPs (0.4 GFLOP at N = 4,096, d = 768), with no host sync: the slots are
# chosen by topk on the device and unused slots are masked, not removed. Latents beyond the
# H busiest stay on the segment path (correct, just slower).
HOT_LATENT_PAIRS = 256  # 32 dependent steps of the kernel's segment walk
HOT_LATENT_SLOTS = 32


class HotLatents(NamedTuple):
    latents: torch.Tensor  # [H] the busiest latents (a slot whose is_hot is False is unused)
    is_hot: torch.Tensor  # [H] bool
    pair_column: torch.Tensor  # [N, k] int64: the slot of each pair's latent, H where not hot
    pair_is_hot: torch.Tensor  # [N, k] bool


def find_hot_latents(indices: torch.Tensor, n_latents: int) -> HotLatents:
    slots = min(HOT_LATENT_SLOTS, n_latents)
    # Pairs per latent: an integer scatter_add_ (exact, so deterministic in any order), not
    # torch.bincount, which syncs with the host on CUDA to size its output.
    flat = indices.reshape(-1).long()  # scatter_add_ takes int64 indices
    counts = torch.zeros(n_latents, dtype=torch.int64, device=indices.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    hot_counts, latents = torch.topk(counts, slots)
    is_hot = hot_counts > HOT_LATENT_PAIRS
    column_of_latent = torch.full((n_latents,), slots, dtype=torch.int64, device=indices.device)
    column_of_latent[latents] = torch.where(is_hot, torch.arange(slots, device=indices.device), slots)
    pair_column = column_of_latent[indices]
    return HotLatents(latents, is_hot, pair_column, pair_column < slots)


def hot_latents_backward(hot: HotLatents, grad_out, values, W_dec, grad_values, grad_W):
    """Fill in grad_W rows (in place) and grad_values entries of the hot latents; returns grad_values."""
    slots = hot.latents.shape[0]
    grad_out32 = grad_out.float()
    if grad_W is not None:
        # column `slots` collects the pairs of other latents and is dropped
        code_hot = torch.zeros(values.shape[0], slots + 1, dtype=torch.float32, device=values.device)
        code_hot.scatter_add_(1, hot.pair_column, values.float())
        rows = code_hot[:, :slots].t() @ grad_out32
        grad_W[hot.latents] = torch.where(hot.is_hot[:, None], rows.to(grad_W.dtype), grad_W[hot.latents])
    if grad_values is not None:
        dots = grad_out32 @ W_dec[hot.latents].float().t()  # [N, H]
        dots = torch.nn.functional.pad(dots, (0, 1))  # column `slots`: not hot
        grad_values = torch.where(hot.pair_is_hot, dots.gather(1, hot.pair_column), grad_values)
    return grad_values


# ---------------------------------------------------------------------------------------------
# Autograd entry points


class SparseDecodeFunction(torch.autograd.Function):
    """Matches fastsae.ops.sparse_decoder.SparseDecodeReference (values, gradients, dtypes).

    Empty codes (N = 0 or k = 0) need no special case: the launches have nothing to do, the
    forward leaves b_dec and the backward writes zero gradients.
    """

    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return sparse_decode_forward(values, indices, W_dec, b_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        need_values, _, need_W, need_b = ctx.needs_input_grad
        grad_values = grad_W = grad_b = None
        if need_values or need_W:
            grad_values, grad_W = sparse_decode_backward(
                grad_out, values, indices, W_dec, need_grad_values=need_values, need_grad_W=need_W)
            if grad_values is not None:
                grad_values = grad_values.to(values.dtype)
        if need_b:
            grad_b = grad_out.float().sum(0).to(W_dec.dtype)
        return grad_values, None, grad_W, grad_b


def _kernel_dtype(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def sparse_decode_triton(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                         b_dec: torch.Tensor) -> torch.Tensor:
    """x_hat [N, d] = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec, in W_dec's dtype.

    values [N, k], indices [N, k] int64 (validated by fastsae.ops.sparse_decode), W_dec [n, d],
    b_dec [d]. Differentiable with respect to values, W_dec and b_dec; accumulation in fp32.
    float64 is refused (the kernels accumulate in fp32; fastsae.ops keeps it on the reference).
    """
    if not _kernel_dtype(W_dec):
        raise TypeError(f"sparse_decode_triton: W_dec must be float32/float16/bfloat16, got {W_dec.dtype}; "
                        "float64 takes fastsae.ops.sparse_decode's reference path")
    return SparseDecodeFunction.apply(values, indices, W_dec, b_dec)


# ---------------------------------------------------------------------------------------------
# Dense code (ReLU SAE)

@triton.jit
def _dense_rows_decode_kernel(
    acts_ptr, W_ptr, b_ptr, out_ptr, rows_ptr, n_rows_ptr,
    n_latents, d, stride_a, stride_w, stride_out,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr,
):
    """out[r] = acts[r] @ W + b for the rows r = rows[:n_rows] (n_rows read on the device).

    The programs past n_rows do nothing: the grid is sized for every row being dense, so the
    launcher needs no count from the device.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if pid_r * BLOCK_R < n_rows:
        _, slot_ok, row = dense_row_block(rows_ptr, n_rows, pid_r, BLOCK_R)
        row = row.to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for n_start in range(0, n_latents, BLOCK_N):
            lats = n_start + tl.arange(0, BLOCK_N)
            lat_ok = lats < n_latents
            a = tl.load(acts_ptr + row[:, None] * stride_a + lats[None, :], mask=slot_ok[:, None] & lat_ok[None, :],
                        other=0.0)
            w = tl.load(W_ptr + lats.to(tl.int64)[:, None] * stride_w + cols[None, :],
                        mask=lat_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(a, w, acc, MATMUL_MODE)
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=slot_ok[:, None] & col_ok[None, :])


# Tiles of the dense-row decode: 64 rows x 64 latents x 64 columns on one warpgroup, the smallest
# wgmma-sized tile; dense rows are the exception (a dense code early in training), so this favours
# few registers over peak throughput.
DENSE_ROWS_CONFIG = dict(BLOCK_R=64, BLOCK_N=64, BLOCK_D=64, num_warps=4, num_stages=3)


def dense_rows_config(mode: str) -> dict:
    """DENSE_ROWS_CONFIG; full-fp32 FMAs ("ieee") unroll the dot over BLOCK_N with both operand
    tiles in registers, which spilled 4.3 KB on sm_80 at 64: 32 latents x 32 columns there."""
    return dict(DENSE_ROWS_CONFIG, BLOCK_N=32, BLOCK_D=32) if mode == "ieee" else dict(DENSE_ROWS_CONFIG)


def compact_dense_code(acts: torch.Tensor):
    """(values [N, C], indices [N, C] int32, DenseRows) of a dense-layout code, on the device.

    Each row's nonzeros in C = sparse_capacity(n) slots, padded with value 0 at latent INT32_MAX
    (the gather skips zero values; the weight gradient's sort puts them past every latent); rows
    with more nonzeros are listed in the DenseRows (whose grad and acts are both the code).
    """
    return compact_active(acts, acts, sparse_capacity(acts.shape[1]), nonzero=True)


class DenseDecodeSparseFunction(torch.autograd.Function):
    """acts @ W_dec + b_dec through the sparse kernels, for a dense-layout code.

    The gradient with respect to acts is grad_out @ W_dec^T at EVERY latent, zero or not: the
    derivative of acts @ W_dec does not vanish where acts is zero. A ReLU encoder's backward
    happens to mask it by acts > 0 afterwards, but dense_decode cannot assume its caller does
    (any function of acts may feed it), so grad_acts is one dense GEMM (cuBLAS), as in the
    reference. (fastsae.ops.relu_autoencode fuses encoder and decoder and needs no such GEMM.)
    grad_W_dec, which does vanish on zeros, is one segmented reduction over the compact entries
    and the dense rows together (kernels/_sparse_code.py: latent_segment_grad), so a 16-bit grad_W_dec
    is rounded once from one fp32 accumulator.
    """

    @staticmethod
    def forward(ctx, acts, W_dec, b_dec):
        acts = acts.contiguous()
        values, indices, dense = compact_dense_code(acts)
        W_row_major = row_major(W_dec)
        out = sparse_decode_forward(values, indices, W_row_major, b_dec)
        n_tokens, d = out.shape
        mode = matmul_mode(W_dec.dtype)
        cfg = dense_rows_config(mode)
        grid = (triton.cdiv(n_tokens, cfg["BLOCK_R"]), triton.cdiv(d, cfg["BLOCK_D"]))
        _dense_rows_decode_kernel[grid](
            acts_ptr=acts, W_ptr=W_row_major, b_ptr=b_dec.contiguous(), out_ptr=out, rows_ptr=dense.rows,
            n_rows_ptr=dense.n_rows, n_latents=acts.shape[1], d=d, stride_a=acts.stride(0),
            stride_w=W_row_major.stride(0), stride_out=out.stride(0), MATMUL_MODE=mode, **cfg)
        ctx.save_for_backward(acts, values, indices, W_dec, dense.count, dense.rows, dense.n_rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        acts, values, indices, W_dec, count, rows, n_rows = ctx.saved_tensors
        need_acts, need_W, need_b = ctx.needs_input_grad
        grad_acts = grad_W = grad_b = None
        if need_acts:
            grad_acts = grad_out.to(W_dec.dtype) @ W_dec.t()
        if need_W:
            grad_out = grad_out.contiguous()
            n_latents, d = W_dec.shape
            mode = matmul_mode(W_dec.dtype)
            # The dense rows' compact entries are partial: left out of the sort, their rows come
            # from acts in the same kernel.
            entries = sort_entries_by_latent(indices, n_latents, segment_config(mode)["BLOCK_L"],
                                             skip_rows=count > values.shape[1])
            grad_W = torch.empty(n_latents, d, dtype=W_dec.dtype, device=W_dec.device)
            latent_segment_grad(grad_out, entries, values.reshape(-1)[entries.order], n_latents, mode,
                                grad_w=grad_W, grad_w_strides=(d, 1), grad_b=None,
                                dense_rows=DenseRows(count, rows, n_rows, acts, acts), dense_masked=False)
        if need_b:
            grad_b = grad_out.float().sum(0).to(W_dec.dtype)
        return grad_acts, grad_W, grad_b


def dense_decode_triton(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """acts [N, n] @ W_dec [n, d] + b_dec -> [N, d] in W_dec's dtype, differentiable.

    Sparse rows (at most sparse_capacity(n) nonzeros) go through the gather kernels, denser rows
    through tensor-core tiles, chosen per row on the device: no host sync. float64 and empty
    codes take one addmm.
    """
    if acts.numel() == 0 or not _kernel_dtype(W_dec):
        return torch.addmm(b_dec, acts, W_dec)
    return DenseDecodeSparseFunction.apply(acts, W_dec, b_dec)
