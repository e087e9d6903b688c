"""ReLU / JumpReLU SAE from input to reconstruction with no [N, n_latents] tensor, at any density.

    reconstruction = code @ W_dec + b_dec,   code = ReLU(pre) or JumpReLU(pre) = pre * (pre > theta),
    pre = x @ W_enc + b_enc;   lp_sum = sum_j |code_j|^p,   l0 = #(code_j > 0),   fire_counts = active tokens per latent.

A ReLU SAE's code is dense when training starts (about half its latents active) and sparse later
(tens of latents of tens of thousands). Each row takes one of two paths, chosen on the device:

Sparse rows (held entries <= C = kernels._sparse_code.sparse_capacity(n)).
- Forward: `_encode_compact_kernel` is the encoder GEMM (the one unavoidable 2*N*d*n) whose
  epilogue writes each row's held entries straight into a capacity-bounded code: values (x's
  dtype), latent ids, for JumpReLU a band flag, and a per-row count, slots claimed with one relaxed
  atomic per (row, tile) that holds entries, entries taken one per row per round. Held = active (code != 0) and, for JumpReLU, inside
  the threshold's band |pre - theta| < bandwidth / 2 (the threshold's gradient needs those,
  inactive ones included). The rows are then sorted by latent id (so every later sum has a fixed
  order), and the sparse decoder's gather (kernels/sparse_decoder.py) decodes them.
- Backward: `_sampled_dots_kernel` forms the code's gradient only at the held entries,
  <grad_out[t], W_dec[i]>, plus the Lp term; grad_x by the TopK encoder's gather; grad_W_enc,
  grad_b_enc, grad_theta and grad_W_dec by its segmented reduction (latent blocks of the entries
  sorted by latent), together with the dense rows below so that each gradient is rounded once.
  O(N * L0 * d) in all.

Dense rows (more than C held entries, or a NaN pre-activation: early training, or bad input).
The latents are processed in chunks of W columns (dense_chunk_width: a [N, W] workspace of fixed
size, not [N, n]) as a fused MLP does, and recomputed in backward instead of stored:
- forward, per chunk: `_dense_code_chunk_kernel` recomputes the chunk's code for the dense rows
  (pre-activations, activation) into the workspace; `_dense_rows_matmul_kernel` adds the chunk's
  code @ W_dec[chunk] into an fp32 accumulator of the dense rows' reconstruction, and their Lp sum
  and L0 (the last chunk adds b_dec and stores the reconstruction in W_dec's dtype).
- backward, per chunk: `_dense_grad_chunk_kernel` recomputes pre-activations and the code's
  gradient (grad_out @ W_dec[chunk]^T, two GEMM tiles in one program) and writes the
  pre-activations' gradient and the code (and JumpReLU's threshold terms); the matmul kernel adds
  their grad_x, `_latent_chunk_grad_kernel` the chunk's rows of grad_W_enc / grad_W_dec (sparse
  entries and dense rows in one fp32 accumulator).
Grids are sized for every row being dense; programs past the device-side count of dense rows exit
at once. Nothing is read back to the host: no sync.

JumpReLU (Rajamanoharan et al. 2024, as SAELens trains it): d code / d pre = H(pre - theta);
d code / d theta = -(theta / bandwidth) rect((pre - theta) / bandwidth); d l0 / d theta =
-(1 / bandwidth) rect(...); d l0 / d pre = 0; rect(u) = 1 for -1/2 < u < 1/2. A NaN
pre-activation stays NaN in the code (as torch.relu(NaN)); the derivative passes where
not (pre <= threshold), as torch.relu's backward does.

The reference (fastsae.ops.relu_autoencoder) is the spec; tests/compile_cases.py records the launches.

This file is longer than the house's ~400 lines because it is one op with forward, backward and
launchers together: the compacting encoder, the dense-row kernels (forward and recomputing
backward), the sampled-dot backward and their configs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import gpu_arch, matmul_mode, mma
from fastsae.kernels._sparse_code import (GATHER_CONFIG, INT32_MAX, SEGMENT_NUM_STAGES, gather_latents_kernel,
                                          marked_tokens, segment_config, sort_entries_by_latent, sparse_capacity,
                                          sparse_decode_forward)
from fastsae.kernels._tiles import (ENCODER_TILE_CONFIGS, GROUP_M, INTERPRETER_ENCODER_TILE_CONFIG,
                                    accumulate_latent_segment, dense_row_block, encoder_preactivation_tile,
                                    grouped_tile, matmul_tile)

# --------------------------------------------------------------------------------------------
# The activation and its penalties


@triton.jit
def activation(pre, theta, JUMP: tl.constexpr):
    """(code, passes): code = pre where pre > theta else 0, NaN kept (torch.relu(NaN) is NaN);
    passes = not (pre <= theta), where d code / d pre is 1 (NaN passes, as in torch.relu's
    backward). ReLU is theta = 0."""
    if JUMP:
        code = tl.where(pre > theta, pre, 0.0)
        passes = ~(pre <= theta)
    else:
        code = tl.where(pre > 0.0, pre, 0.0)
        passes = ~(pre <= 0.0)
    code = tl.where(pre != pre, pre, code)
    return code, passes


@triton.jit
def in_band(pre, theta, bandwidth):
    """rect((pre - theta) / bandwidth) as a bool, exactly as SAELens evaluates it."""
    u = (pre - theta) / bandwidth
    return (u > -0.5) & (u < 0.5)


@triton.jit
def abs_pow(v, p, P_ONE: tl.constexpr):
    """|v|^p for p > 0 (0 at 0, NaN for NaN)."""
    if P_ONE:
        return tl.abs(v)
    else:
        a = tl.abs(v)
        # log2 of a clamped to the smallest normal fp32: no log2(0) (the 0 is selected away); the
        # clamp drops a NaN (max.f32 returns the other operand), so NaN is put back last.
        powered = tl.where(a == 0.0, 0.0, tl.exp2(p * tl.log2(tl.maximum(a, 1.1754943508222875e-38))))
        return tl.where(a != a, a, powered)


@triton.jit
def abs_pow_grad(v, p, P_ONE: tl.constexpr):
    """d |v|^p / d v for a code value v >= 0 (or NaN): p v^(p-1) where v > 0, 0 at 0, NaN for NaN."""
    if P_ONE:
        g = tl.where(v > 0.0, 1.0, 0.0)
    else:
        g = tl.where(v > 0.0, p * tl.exp2((p - 1.0) * tl.log2(tl.maximum(v, 1.1754943508222875e-38))), 0.0)
    return tl.where(v != v, v, g)


# --------------------------------------------------------------------------------------------
# Forward: the encoder GEMM with a compacting epilogue


@triton.jit
def _encode_compact_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, val_ptr, idx_ptr, band_ptr, count_ptr, fire_counts_ptr,
    n_tokens, d_in, n_latents, capacity,
    stride_xm, stride_xd, stride_wd, stride_wn,
    bandwidth,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    MATMUL_MODE: tl.constexpr, JUMP: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of pre-activations; its held entries go to the compact code.

    val / idx / band: [N, capacity]; count: [N] int32, zeroed by the launcher, counts every held
    entry of the row (past the capacity too: such a row is dense); a NaN pre-activation adds
    capacity + 1 (the row goes dense, where the GEMMs spread the NaN as the reference's do).
    fire_counts: [n] int32, zeroed by the launcher: each latent's active tokens (one relaxed
    integer atomic per latent of a tile with an active entry; integer sums are order-free).

    The epilogue claims the row's slots with one relaxed atomic per row of the tile, then takes
    the held entries one per row per round (a max with index over the tile, as the TopK kernel's
    selection rounds): rounds = the most entries any row of the tile stores, one or two for a
    trained SAE's code (0.1 % active: about 0.14 per row and tile), at most the capacity left for
    a dense one. Scattering the whole tile at once (a cumsum of the held mask and per-element
    addresses) held about 6 registers per element and spilled 1.3 to 2.3 KB on sm_90.
    """
    # Grouped order (as the ReLU encoder): GROUP_M row blocks sweep the latent blocks together.
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_tokens, n_latents, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = pid_n * BLOCK_N + offs_n
    row_ok = rows < n_tokens
    col_ok = cols < n_latents
    pre = encoder_preactivation_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, d_in,
                                     stride_xm, stride_xd, stride_wd, stride_wn,
                                     BLOCK_M, BLOCK_N, BLOCK_D, MATMUL_MODE)
    theta = 0.0
    if JUMP:
        theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    code, _ = activation(pre, theta, JUMP)
    value = code.to(val_ptr.dtype.element_ty).to(tl.float32)
    in_tile = row_ok[:, None] & col_ok[None, :]
    held = in_tile & (value != 0.0)  # NaN != 0
    if JUMP:
        held = held | (in_tile & in_band(pre, theta, bandwidth))
    n_held = tl.sum(held.to(tl.int32), axis=1)
    has_nan = tl.max((in_tile & (pre != pre)).to(tl.int32), axis=1)
    n_add = n_held + has_nan * (capacity + 1)
    # A sparse code leaves most tiles without a held entry: their epilogue ends here.
    if tl.max(n_add, axis=0) > 0:
        active = tl.sum((in_tile & (value > 0.0)).to(tl.int32), axis=0)
        tl.atomic_add(fire_counts_ptr + cols, active, mask=col_ok, sem="relaxed")
        base = tl.atomic_add(count_ptr + rows, n_add, mask=row_ok & (n_add > 0), sem="relaxed")
        room = tl.where(has_nan > 0, 0, tl.maximum(0, tl.minimum(n_held, capacity - base)))
        # Held entries are never -inf. A NaN row takes no slot (room 0); its NaN stays out of the
        # key, where the interpreter's argmax would raise on an all-NaN row.
        key = tl.where(held & (pre == pre), pre, float("-inf"))
        out = rows.to(tl.int64) * capacity + base
        for i in range(0, tl.max(room, axis=0)):
            best, col = tl.max(key, axis=1, return_indices=True)
            take = i < room
            latent = pid_n * BLOCK_N + col
            theta_row = 0.0
            if JUMP:
                theta_row = tl.load(theta_ptr + latent, mask=take, other=0.0).to(tl.float32)
            code_row = activation(best, theta_row, JUMP)[0]
            tl.store(val_ptr + out + i, code_row.to(val_ptr.dtype.element_ty), mask=take)
            tl.store(idx_ptr + out + i, latent, mask=take)
            if JUMP:
                tl.store(band_ptr + out + i, in_band(best, theta_row, bandwidth).to(tl.uint8), mask=take)
            key = tl.where(offs_n[None, :] == col[:, None], float("-inf"), key)


# --------------------------------------------------------------------------------------------
# Dense rows, one chunk of latents at a time


@triton.jit
def _dense_code_chunk_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, rows_ptr, n_rows_ptr, ws_ptr,
    d_in, n_latents, chunk_start, chunk_width,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_ws,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr,
    JUMP: tl.constexpr,
):
    """ws[s, j] = code of dense row rows[s] at latent chunk_start + j, for s < n_rows (on the device)."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if pid_r * BLOCK_R < n_rows:
        slots, slot_ok, row = dense_row_block(rows_ptr, n_rows, pid_r, BLOCK_R)
        local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = chunk_start + local
        col_ok = (local < chunk_width) & (cols < n_latents)
        pre = encoder_preactivation_tile(x_ptr, w_ptr, b_ptr, row, cols, slot_ok, col_ok, d_in,
                                         stride_xm, stride_xd, stride_wd, stride_wn,
                                         BLOCK_R, BLOCK_N, BLOCK_D, MATMUL_MODE)
        theta = 0.0
        if JUMP:
            theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        code, _ = activation(pre, theta, JUMP)
        tl.store(ws_ptr + slots.to(tl.int64)[:, None] * stride_ws + local[None, :],
                 code.to(ws_ptr.dtype.element_ty), mask=slot_ok[:, None] & col_ok[None, :])


@triton.jit
def _dense_rows_matmul_kernel(
    ws_ptr, m_ptr, bias_ptr, acc_ptr, out_ptr, rows_ptr, n_rows_ptr, lp_ptr, l0_ptr,
    d, n_latents, chunk_start, chunk_width,
    stride_ws, stride_mk, stride_md, stride_acc, stride_out,
    p,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, MATMUL_MODE: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, HAS_BIAS: tl.constexpr, CODE_STATS: tl.constexpr,
    P_ONE: tl.constexpr,
):
    """out[rows[s]] (+)= ws[s, :chunk_width] @ M[chunk_start:, cols] for the dense rows s < n_rows.

    Forward: M = W_dec, the chunk's decode (CODE_STATS: also the rows' Lp sum and L0, by the
    column-block-0 programs). Backward: M = W_enc^T, the chunk's grad_x. Between chunks the sum
    lives in an fp32 [N, d] accumulator (acc, indexed by row id); LAST adds the bias and writes out
    in its dtype, so the output is rounded once.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if pid_r * BLOCK_R < n_rows:
        slots, slot_ok, row = dense_row_block(rows_ptr, n_rows, pid_r, BLOCK_R)
        row = row.to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        tile_ok = slot_ok[:, None] & col_ok[None, :]
        if FIRST:
            acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        else:
            acc = tl.load(acc_ptr + row[:, None] * stride_acc + cols[None, :], mask=tile_ok, other=0.0)
        lp = tl.zeros([BLOCK_R], dtype=tl.float32)
        l0 = tl.zeros([BLOCK_R], dtype=tl.float32)
        ws_rows = ws_ptr + slots.to(tl.int64)[:, None] * stride_ws
        for k_start in range(0, chunk_width, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_ok = (ks < chunk_width) & (chunk_start + ks < n_latents)
            a = tl.load(ws_rows + ks[None, :], mask=slot_ok[:, None] & k_ok[None, :], other=0.0)
            m = tl.load(m_ptr + (chunk_start + ks).to(tl.int64)[:, None] * stride_mk + cols[None, :] * stride_md,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(a, m, acc, MATMUL_MODE)
            if CODE_STATS:
                af = a.to(tl.float32)
                lp += tl.sum(abs_pow(af, p, P_ONE), axis=1)
                l0 += tl.sum((af > 0.0).to(tl.float32), axis=1)
        if LAST:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + row[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=tile_ok)
        else:
            tl.store(acc_ptr + row[:, None] * stride_acc + cols[None, :], acc, mask=tile_ok)
        if CODE_STATS:
            if pid_d == 0:
                if not FIRST:
                    lp += tl.load(lp_ptr + row, mask=slot_ok, other=0.0)
                    l0 += tl.load(l0_ptr + row, mask=slot_ok, other=0.0)
                tl.store(lp_ptr + row, lp, mask=slot_ok)
                tl.store(l0_ptr + row, l0, mask=slot_ok)


@triton.jit
def _dense_grad_chunk_kernel(
    x_ptr, w_ptr, b_ptr, theta_ptr, wdec_ptr, g_ptr, grad_lp_ptr, grad_l0_ptr, rows_ptr, n_rows_ptr,
    gpre_ws_ptr, code_ws_ptr, theta_ws_ptr,
    d_in, d_out, n_latents, chunk_start, chunk_width,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_wdec, stride_g, stride_ws,
    p, bandwidth,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr,
    JUMP: tl.constexpr, P_ONE: tl.constexpr, D_OUT_IS_D_IN: tl.constexpr,
):
    """For the dense rows s < n_rows and one tile of the chunk's latents, recompute
    pre = x @ W_enc + b and the code's gradient grad_out @ W_dec^T + grad_lp * d|code|^p, and write
      gpre_ws[s, j] = the pre-activations' gradient (x's dtype), code_ws[s, j] = the code,
      theta_ws[s, j] = JumpReLU's threshold terms of the code and of L0 (fp32).
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_rows = tl.load(n_rows_ptr)
    if pid_r * BLOCK_R < n_rows:
        slots, slot_ok, row = dense_row_block(rows_ptr, n_rows, pid_r, BLOCK_R)
        local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = chunk_start + local
        col_ok = (local < chunk_width) & (cols < n_latents)
        pre = encoder_preactivation_tile(x_ptr, w_ptr, b_ptr, row, cols, slot_ok, col_ok, d_in,
                                         stride_xm, stride_xd, stride_wd, stride_wn,
                                         BLOCK_R, BLOCK_N, BLOCK_D, MATMUL_MODE)
        # grad_out[rows] @ W_dec[cols]^T over d_out (an SAE's d_in: one loop bound, fewer registers)
        dots = matmul_tile(g_ptr, wdec_ptr, row, cols, slot_ok, col_ok, d_in if D_OUT_IS_D_IN else d_out, stride_g, 1,
                           1, stride_wdec, BLOCK_R, BLOCK_N, BLOCK_D, MATMUL_MODE)  # W_dec's rows: K-major B operand
        theta = 0.0
        if JUMP:
            theta = tl.load(theta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        code, passes = activation(pre, theta, JUMP)
        value = code.to(code_ws_ptr.dtype.element_ty)
        grad_lp = tl.load(grad_lp_ptr + row, mask=slot_ok, other=0.0)
        grad_code = dots + grad_lp[:, None] * abs_pow_grad(value.to(tl.float32), p, P_ONE)
        tile_ok = slot_ok[:, None] & col_ok[None, :]
        ws = slots.to(tl.int64)[:, None] * stride_ws + local[None, :]
        tl.store(gpre_ws_ptr + ws, tl.where(passes, grad_code, 0.0).to(gpre_ws_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(code_ws_ptr + ws, value, mask=tile_ok)
        if JUMP:
            grad_l0 = tl.load(grad_l0_ptr + row, mask=slot_ok, other=0.0)
            term = -(theta / bandwidth) * grad_code - grad_l0[:, None] / bandwidth
            tl.store(theta_ws_ptr + ws, tl.where(in_band(pre, theta, bandwidth), term, 0.0), mask=tile_ok)


@triton.jit
def _latent_chunk_grad_kernel(
    rows_ptr_b, tok_ptr, lat_ptr, weight_ptr, block_start_ptr, grad_w_ptr, grad_b_ptr,
    theta_weight_ptr, grad_theta_ptr, dense_rows_ptr, n_dense_rows_ptr, ws_ptr, theta_ws_ptr,
    d, n_latents, first_block, chunk_start,
    stride_bm, stride_bd, stride_gwd, stride_gwn, stride_ws,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, MATMUL_MODE: tl.constexpr,
    WRITE_BIAS: tl.constexpr, WRITE_THETA: tl.constexpr,
):
    """grad_W[l] = sum over the sparse entries e of latent l of weight[e] * B[tok[e]] (the TopK
    encoder's segmented reduction, accumulate_latent_segment) + sum over the dense rows s of
    ws[s, l - chunk_start] * B[rows[s]], for the latent blocks of one chunk (first_block on).

    Encoder: B = x, weight = the pre-activations' gradient, grad_b, and (WRITE_THETA) grad_theta[l]
    = the threshold terms of the entries and of the dense rows. Decoder: B = grad_out, weight =
    the code. One fp32 accumulator per tile: a 16-bit gradient is rounded once.
    """
    pid_l = tl.program_id(0) + first_block
    pid_d = tl.program_id(1)
    latent0 = pid_l * BLOCK_L
    offs_l = tl.arange(0, BLOCK_L)
    lats = latent0 + offs_l
    l_ok = lats < n_latents
    local = lats - chunk_start
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ds64 = ds.to(tl.int64)
    d_ok = ds < d
    entry_start = tl.load(block_start_ptr + pid_l)
    entry_end = tl.load(block_start_ptr + pid_l + 1)

    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc, bias_acc = accumulate_latent_segment(acc, bias_acc, rows_ptr_b, tok_ptr, lat_ptr, weight_ptr, entry_start,
                                              entry_end, latent0, ds64, d_ok, stride_bm, stride_bd,
                                              BLOCK_L, BLOCK_E, MATMUL_MODE, WRITE_BIAS)
    n_dense = tl.load(n_dense_rows_ptr)
    for r_start in range(0, n_dense, BLOCK_E):
        rs = r_start + tl.arange(0, BLOCK_E)
        r_ok = rs < n_dense
        row = tl.load(dense_rows_ptr + rs, mask=r_ok, other=0).to(tl.int64)
        ws_t = tl.load(ws_ptr + rs.to(tl.int64)[None, :] * stride_ws + local[:, None],
                       mask=l_ok[:, None] & r_ok[None, :], other=0.0)
        b_rows = tl.load(rows_ptr_b + row[:, None] * stride_bm + ds64[None, :] * stride_bd,
                         mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        ws_t = ws_t.to(b_rows.dtype)
        acc = mma(ws_t, b_rows, acc, MATMUL_MODE)
        if WRITE_BIAS:
            bias_acc += tl.sum(ws_t.to(tl.float32), axis=1)
    tl.store(grad_w_ptr + lats.to(tl.int64)[:, None] * stride_gwn + ds64[None, :] * stride_gwd,
             acc.to(grad_w_ptr.dtype.element_ty), mask=l_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        if WRITE_BIAS:
            tl.store(grad_b_ptr + lats, bias_acc.to(grad_b_ptr.dtype.element_ty), mask=l_ok)
        if WRITE_THETA:
            theta_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
            for e_start in range(entry_start, entry_end, BLOCK_E):
                es = e_start + tl.arange(0, BLOCK_E)
                e_ok = es < entry_end
                latent = tl.load(lat_ptr + es, mask=e_ok, other=-1)
                term = tl.load(theta_weight_ptr + es, mask=e_ok, other=0.0)
                theta_acc += tl.sum(tl.where(offs_l[:, None] == (latent - latent0)[None, :], term[None, :], 0.0), axis=1)
            for r_start in range(0, n_dense, BLOCK_E):
                rs = r_start + tl.arange(0, BLOCK_E)
                r_ok = rs < n_dense
                term_t = tl.load(theta_ws_ptr + rs.to(tl.int64)[None, :] * stride_ws + local[:, None],
                                 mask=l_ok[:, None] & r_ok[None, :], other=0.0)
                theta_acc += tl.sum(term_t, axis=1)
            tl.store(grad_theta_ptr + lats, theta_acc.to(grad_theta_ptr.dtype.element_ty), mask=l_ok)


# --------------------------------------------------------------------------------------------
# Backward of the sparse rows: the code's gradient at the held entries only


@triton.jit
def _sampled_dots_kernel(
    g_ptr, w_ptr, idx_ptr, slots_ptr, out_ptr,
    n_tokens, d, capacity, stride_g, stride_w,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, j] = <g[t], W[idx[t, j]]> in fp32 for the row's first slots[t] entries (others untouched)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < n_tokens
    tokens64 = tokens.to(tl.int64)
    row_slots = tl.load(slots_ptr + tokens, mask=t_ok, other=0)
    code = tokens64 * capacity
    for j in range(0, tl.max(row_slots, axis=0)):
        live = j < row_slots
        latent = tl.load(idx_ptr + code + j, mask=live, other=0).to(tl.int64)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d_start in range(0, d, BLOCK_D):
            ds = d_start + tl.arange(0, BLOCK_D)
            d_ok = ds < d
            g = tl.load(g_ptr + tokens64[:, None] * stride_g + ds[None, :], mask=t_ok[:, None] & d_ok[None, :],
                        other=0.0)
            w = tl.load(w_ptr + latent[:, None] * stride_w + ds[None, :], mask=live[:, None] & d_ok[None, :],
                        other=0.0)
            dot += tl.sum(g.to(tl.float32) * w.to(tl.float32), axis=1)
        tl.store(out_ptr + code + j, dot, mask=live)


# --------------------------------------------------------------------------------------------
# Launch configuration (their compile facts: tests/compile_check.py)

# The encoder with its compacting epilogue: the encoder GEMM tiles (kernels/_tiles.py: ENCODER_TILE_CONFIGS).
# The dense-row code kernel: 64 rows x 128 latents x 64 columns on one warpgroup. The gradient
# kernel holds two such accumulators (pre-activations and the code's gradient) and, for JumpReLU,
# the threshold terms: on one warpgroup that spilled up to 280 B on sm_90 (255 registers), on two
# (8 warps, each a [64, 64] half of both tiles) it does not. The matmul: 64 rows x 128 columns x
# 32 latents per step, on 8 warps: with the code's Lp / L0 sums in its loop, 4 warps spilled up
# to 48 B on sm_80, and 64 latents per step 8 B for the first chunk at p != 1 (recorded launches).
DENSE_TILE_CONFIG = dict(BLOCK_R=64, BLOCK_N=128, BLOCK_D=64, num_warps=4, num_stages=3)
DENSE_GRAD_CONFIG = dict(BLOCK_R=64, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
DENSE_MATMUL_CONFIG = dict(BLOCK_R=64, BLOCK_D=128, BLOCK_K=32, num_warps=8, num_stages=3)
# Full-fp32 FMAs ("ieee") hold both operand tiles in registers: smaller tiles (the encoder's
# 128 x 128 tile spilled 40 to 64 B there). (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).
ENCODE_CONFIG_FMA = (32, 64, 16, 8, 3)
# JumpReLU's epilogue also holds the threshold and its band: on the ReLU encoder's 128 x 128 tile
# it reached 255 registers and spilled 8 to 40 B on sm_90; 128 x 64 compiles to 128-138 registers
# with no spill (tests/compile_check.py).
FWD_CONFIGS_JUMP = {torch.float16: (128, 64, 64, 8, 3), torch.bfloat16: (128, 64, 64, 8, 3),
                    torch.float32: (128, 64, 32, 8, 3)}
DENSE_TILE_CONFIG_FMA = dict(BLOCK_R=32, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=3)
DENSE_MATMUL_CONFIG_FMA = dict(BLOCK_R=32, BLOCK_D=64, BLOCK_K=16, num_warps=4, num_stages=3)
SAMPLED_DOTS_CONFIG = dict(BLOCK_T=4, BLOCK_D=256, num_warps=4)
# The interpreter (CPU tests) pays per program and per tile op: small tiles.
INTERPRETER_DENSE_TILE_CONFIG = dict(BLOCK_R=16, BLOCK_N=32, BLOCK_D=32, num_warps=4, num_stages=1)
INTERPRETER_DENSE_MATMUL_CONFIG = dict(BLOCK_R=16, BLOCK_D=32, BLOCK_K=32, num_warps=4, num_stages=1)

# The dense rows' workspaces are [N, W]: W = dense_chunk_width(N, n, elements) latents, a multiple
# of CHUNK_ALIGN (every latent tile of the chunk kernels divides it), with N * W at most the
# caller's budget (fastsae.ops.relu_autoencoder: 4 x CHUNK_ELEMENTS = 2^26 by default, 4,096
# latents a chunk at 16,384 tokens, 12 chunks at n = 46,080), so memory does not grow with n.
CHUNK_ALIGN = 128


def dense_chunk_width(n_tokens: int, n_latents: int, workspace_elements: int) -> int:
    """Latents per chunk of the dense rows' path (a multiple of CHUNK_ALIGN, at least one)."""
    width = max(CHUNK_ALIGN, workspace_elements // max(1, n_tokens) // CHUNK_ALIGN * CHUNK_ALIGN)
    return min(width, triton.cdiv(n_latents, CHUNK_ALIGN) * CHUNK_ALIGN)


def _configs(x: torch.Tensor, mode: str, jump: bool = False) -> tuple[tuple, dict, dict, dict]:
    """(encoder config, dense code tile, dense gradient tile, dense matmul) for x's device, the mode
    and the activation (JumpReLU: a narrower encoder tile)."""
    if gpu_arch(x.device) is None:
        return (INTERPRETER_ENCODER_TILE_CONFIG, dict(INTERPRETER_DENSE_TILE_CONFIG),
                dict(INTERPRETER_DENSE_TILE_CONFIG), dict(INTERPRETER_DENSE_MATMUL_CONFIG))
    if mode == "ieee":
        return (ENCODE_CONFIG_FMA, dict(DENSE_TILE_CONFIG_FMA), dict(DENSE_TILE_CONFIG_FMA),
                dict(DENSE_MATMUL_CONFIG_FMA))
    encode = (FWD_CONFIGS_JUMP if jump else ENCODER_TILE_CONFIGS)[x.dtype]
    return encode, dict(DENSE_TILE_CONFIG), dict(DENSE_GRAD_CONFIG), dict(DENSE_MATMUL_CONFIG)


# --------------------------------------------------------------------------------------------
# Launchers


class CompactCode(NamedTuple):
    """The forward's code, on the device: sparse rows compact, dense rows listed."""

    values: torch.Tensor  # [N, C] x's dtype: held entries sorted by latent; 0 past slots (and in dense rows)
    indices: torch.Tensor  # [N, C] int32: their latents; INT32_MAX past slots
    band: torch.Tensor | None  # [N, C] uint8 (JumpReLU): the entry lies in the threshold's band
    slots: torch.Tensor  # [N] int32: held entries of a sparse row, 0 for a dense row
    dense: torch.Tensor  # [N] bool: the row is dense (held entries > C, or a NaN)
    rows: torch.Tensor  # [N] int32: row ids, the dense rows first
    n_rows: torch.Tensor  # [1] int32: how many dense rows


def encode_compact(x, W_enc, b_enc, theta, bandwidth) -> tuple[CompactCode, torch.Tensor]:
    """(CompactCode, fire_counts int32 [n]) of x [N, d] (contiguous), W_enc [d, n], b_enc, theta or None."""
    n_tokens, d_in = x.shape
    n_latents = W_enc.shape[1]
    capacity = sparse_capacity(n_latents)
    jump = theta is not None
    device = x.device
    values = torch.zeros(n_tokens, capacity, dtype=x.dtype, device=device)
    indices = torch.full((n_tokens, capacity), INT32_MAX, dtype=torch.int32, device=device)
    band = torch.zeros(n_tokens, capacity, dtype=torch.uint8, device=device) if jump else None
    count = torch.zeros(n_tokens, dtype=torch.int32, device=device)
    fire_counts = torch.zeros(n_latents, dtype=torch.int32, device=device)
    mode = matmul_mode(x.dtype)
    (block_m, block_n, block_d, num_warps, num_stages), _, _, _ = _configs(x, mode, jump)
    grid = (triton.cdiv(n_tokens, block_m) * triton.cdiv(n_latents, block_n),)
    _encode_compact_kernel[grid](
        x_ptr=x, w_ptr=W_enc, b_ptr=b_enc, theta_ptr=theta, val_ptr=values, idx_ptr=indices, band_ptr=band,
        count_ptr=count, fire_counts_ptr=fire_counts,  # theta, band: None for ReLU (JUMP reads them)
        n_tokens=n_tokens, d_in=d_in, n_latents=n_latents, capacity=capacity,
        stride_xm=x.stride(0), stride_xd=x.stride(1), stride_wd=W_enc.stride(0), stride_wn=W_enc.stride(1),
        bandwidth=float(1.0 if bandwidth is None else bandwidth),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GROUP_M=GROUP_M, MATMUL_MODE=mode, JUMP=jump,
        num_warps=num_warps, num_stages=num_stages,
    )
    dense = count > capacity
    # Each row's entries in latent order (their slots were claimed in whatever order the tiles
    # ran): every later sum over a row then has one order, so the results are deterministic.
    indices, order = torch.sort(indices, dim=1)
    values = values.gather(1, order)
    band = band.gather(1, order) if jump else None
    # A dense row's compact entries are a partial list: blank them, its row comes from the chunks.
    values = values.masked_fill(dense[:, None], 0)
    indices = indices.masked_fill(dense[:, None], INT32_MAX)
    if jump:
        band = band.masked_fill(dense[:, None], 0)
    slots = torch.where(dense, 0, count)
    rows = torch.sort(dense.to(torch.uint8), descending=True, stable=True).indices.to(torch.int32)
    n_rows = dense.sum(dtype=torch.int32).reshape(1)
    return CompactCode(values, indices, band, slots, dense, rows, n_rows), fire_counts


def relu_autoencode_forward(x, W_enc, b_enc, W_dec, b_dec, theta, bandwidth, p, workspace_elements):
    """(reconstruction [N, d_out] W_dec.dtype, lp_sum [N] fp32, l0 [N] fp32, fire_counts [n] int32, CompactCode).

    x [N, d_in] contiguous, W_enc [d_in, n] (latent-major is fastest), W_dec [n, d_out] row-major, b_dec [d_out]
    (a transcoder's d_out may differ from d_in)."""
    n_tokens, d_in = x.shape
    n_latents, d_out = W_dec.shape
    code, fire_counts = encode_compact(x, W_enc, b_enc, theta, bandwidth)
    jump = theta is not None
    values32 = code.values.float()
    lp_sparse = values32.abs().sum(1) if p == 1 else values32.abs().pow(p).sum(1)
    l0_sparse = (code.values > 0).sum(1, dtype=torch.float32)
    recon = sparse_decode_forward(code.values, code.indices, W_dec, b_dec)

    # Dense rows: chunks of latents through a fixed-size workspace.
    mode = matmul_mode(x.dtype)
    _, tile_cfg, _, mm_cfg = _configs(x, mode)
    width = dense_chunk_width(n_tokens, n_latents, workspace_elements)
    ws = torch.empty(n_tokens, width, dtype=x.dtype, device=x.device)
    several = n_latents > width
    acc = torch.empty(n_tokens if several else 1, d_out, dtype=torch.float32, device=x.device)
    lp_dense = torch.empty(n_tokens, dtype=torch.float32, device=x.device)
    l0_dense = torch.empty(n_tokens, dtype=torch.float32, device=x.device)
    for chunk_start in range(0, n_latents, width):
        chunk_width = min(width, n_latents - chunk_start)
        cfg = dict(tile_cfg)
        grid = (triton.cdiv(n_tokens, cfg["BLOCK_R"]), triton.cdiv(chunk_width, cfg["BLOCK_N"]))
        _dense_code_chunk_kernel[grid](
            x_ptr=x, w_ptr=W_enc, b_ptr=b_enc, theta_ptr=theta, rows_ptr=code.rows, n_rows_ptr=code.n_rows, ws_ptr=ws,
            d_in=d_in, n_latents=n_latents, chunk_start=chunk_start, chunk_width=chunk_width,
            stride_xm=x.stride(0), stride_xd=x.stride(1), stride_wd=W_enc.stride(0), stride_wn=W_enc.stride(1),
            stride_ws=ws.stride(0), MATMUL_MODE=mode, JUMP=jump, **cfg)
        cfg = dict(mm_cfg)
        grid = (triton.cdiv(n_tokens, cfg["BLOCK_R"]), triton.cdiv(d_out, cfg["BLOCK_D"]))
        _dense_rows_matmul_kernel[grid](
            ws_ptr=ws, m_ptr=W_dec, bias_ptr=b_dec, acc_ptr=acc, out_ptr=recon, rows_ptr=code.rows,
            n_rows_ptr=code.n_rows, lp_ptr=lp_dense, l0_ptr=l0_dense,
            d=d_out, n_latents=n_latents, chunk_start=chunk_start, chunk_width=chunk_width,
            stride_ws=ws.stride(0), stride_mk=W_dec.stride(0), stride_md=W_dec.stride(1), stride_acc=acc.stride(0),
            stride_out=recon.stride(0), p=float(p),
            MATMUL_MODE=mode, FIRST=chunk_start == 0, LAST=chunk_start + width >= n_latents, HAS_BIAS=True,
            CODE_STATS=True, P_ONE=p == 1, **cfg)
    lp_sum = torch.where(code.dense, lp_dense, lp_sparse)
    l0 = torch.where(code.dense, l0_dense, l0_sparse)
    return recon, lp_sum, l0, fire_counts, code


class _Backward(NamedTuple):
    """What every step of relu_autoencode_backward reads: the forward's inputs and code, the incoming gradients
    (g: grad_recon contiguous; grad_lp and grad_l0 contiguous fp32, grad_l0 None for ReLU) and the operand mode."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    theta: torch.Tensor | None
    bandwidth: float | None
    p: float
    code: CompactCode
    g: torch.Tensor
    grad_lp: torch.Tensor
    grad_l0: torch.Tensor | None
    mode: str


class _LatentReductions(NamedTuple):
    """The per-latent reductions' operands, the held entries sorted by latent with their tokens and weights in
    that order, and their outputs, allocated once and written chunk by chunk (_latent_chunk_grads)."""

    entries: tuple  # SortedEntries (fastsae.kernels._sparse_code) of the code's indices
    tokens_x: torch.Tensor  # the entries' tokens, marked for x
    tokens_g: torch.Tensor  # ... and for grad_recon
    sorted_gpre: torch.Tensor  # the pre-activations' gradient: W_enc's and b_enc's weights
    sorted_values: torch.Tensor  # the code: W_dec's weights
    sorted_theta: torch.Tensor | None  # the threshold's terms (JumpReLU): theta's weights
    grad_w_enc: torch.Tensor
    grad_b_enc: torch.Tensor
    grad_theta: torch.Tensor | None
    grad_w_dec: torch.Tensor


def relu_autoencode_backward(grad_recon, grad_lp, grad_l0, x, W_enc, b_enc, W_dec, theta, bandwidth, p,
                             code: CompactCode, needs: tuple, workspace_elements: int):
    """(grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, grad_theta); None where not needed.

    grad_recon [N, d_out] (W_dec's dtype), grad_lp [N] and grad_l0 [N] (fp32; grad_l0 only for JumpReLU).
    The encoder's gradients run over d_in (x, W_enc), the decoder's over d_out (grad_recon, W_dec).

    The steps: the sparse rows' held entries (their pre-activations' gradient and threshold terms, then x's
    gradient gathered from them), the held entries sorted for the per-latent reductions, then the dense rows
    chunk by chunk of latents, each chunk also running the per-latent reductions over its latents; b_dec last."""
    need_x, need_w_enc, need_b_enc, need_w_dec, need_b_dec, need_theta = needs
    bw = _Backward(x, W_enc, b_enc, W_dec, theta, bandwidth, p, code, g=grad_recon.contiguous(),
                   grad_lp=grad_lp.float().contiguous(),
                   grad_l0=grad_l0.float().contiguous() if theta is not None else None, mode=matmul_mode(x.dtype))
    grad_pre, theta_terms = _sparse_entries_grad(bw)
    grad_x = _sparse_rows_grad_x(bw, grad_pre) if need_x else None
    need_enc_params = need_w_enc or need_b_enc or need_theta
    sums = _latent_reductions(bw, grad_pre, theta_terms) if need_enc_params or need_w_dec else None
    _dense_rows_grads(bw, grad_x, sums, workspace_elements)
    grad_b_dec = bw.g.float().sum(0).to(W_dec.dtype) if need_b_dec else None
    return (grad_x, sums.grad_w_enc if need_w_enc else None, sums.grad_b_enc if need_b_enc else None,
            sums.grad_w_dec if need_w_dec else None, grad_b_dec, sums.grad_theta if need_theta else None)


def _sparse_entries_grad(bw: _Backward) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_pre [N, C] x's dtype, theta_terms [N, C] fp32 or None) at the sparse rows' held entries.

    The code's gradient there is grad_recon . W_dec[latent] (the sampled dots) + grad_lp * d|v|^p/dv; grad_pre
    keeps it where the entry fires, theta_terms (JumpReLU) is the threshold's term where it lies in the band."""
    code, p = bw.code, bw.p
    n_tokens = bw.x.shape[0]
    n_latents, d_out = bw.W_dec.shape
    capacity = code.values.shape[1]
    dots = torch.empty(n_tokens, capacity, dtype=torch.float32, device=bw.x.device)
    cfg = dict(SAMPLED_DOTS_CONFIG)
    _sampled_dots_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_T"]),)](
        g_ptr=bw.g, w_ptr=bw.W_dec, idx_ptr=code.indices, slots_ptr=code.slots, out_ptr=dots,
        n_tokens=n_tokens, d=d_out, capacity=capacity, stride_g=bw.g.stride(0), stride_w=bw.W_dec.stride(0), **cfg)
    values32 = code.values.float()
    active = values32 > 0
    dlp = active.to(torch.float32) if p == 1 else torch.where(active, p * values32.clamp_min(1e-38).pow(p - 1), 0)
    grad_code = dots + bw.grad_lp[:, None] * dlp
    grad_pre = torch.where(active, grad_code, 0).to(bw.x.dtype)
    if bw.theta is None:
        return grad_pre, None
    theta_at = bw.theta.float()[code.indices.clamp_max(n_latents - 1)]
    term = -(theta_at / bw.bandwidth) * grad_code - bw.grad_l0[:, None] / bw.bandwidth
    return grad_pre, torch.where(code.band.bool(), term, 0)


def _sparse_rows_grad_x(bw: _Backward, grad_pre: torch.Tensor) -> torch.Tensor:
    """grad_x [N, d_in] (x's dtype) of the sparse rows: grad_pre gathered over W_enc's columns of the held latents.
    The dense rows' come later, chunk by chunk (_dense_rows_grad_x)."""
    x, W_enc, code = bw.x, bw.W_enc, bw.code
    n_tokens, d_in = x.shape
    grad_x = torch.empty(n_tokens, d_in, dtype=x.dtype, device=x.device)
    cfg = GATHER_CONFIG
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_M"]), triton.cdiv(d_in, cfg["BLOCK_D"]))
    # ROW_COUNTS reads slots as the row counts. The dense rows come from the chunks, not from the
    # gather's per-row dense fallback (HAS_DENSE_ROWS off): its pointers are None.
    gather_latents_kernel[grid](
        grad_ptr=grad_pre, idx_ptr=code.indices, w_ptr=W_enc, out_ptr=grad_x, count_ptr=code.slots,
        dense_grad_ptr=None, acts_ptr=None,
        n_tokens=n_tokens, d_in=d_in, k=code.values.shape[1], n_latents=bw.W_dec.shape[0],
        stride_wd=W_enc.stride(0), stride_wn=W_enc.stride(1), stride_gm=0, stride_gn=0,
        ROW_COUNTS=True, HAS_DENSE_ROWS=False, MATMUL_MODE=bw.mode, **cfg)
    return grad_x


def _latent_reductions(bw: _Backward, grad_pre: torch.Tensor, theta_terms: torch.Tensor | None) -> _LatentReductions:
    """The held entries sorted by latent with their weights (grad_pre, the code, theta_terms) in that order, and the
    per-latent gradients allocated (W_enc, b_enc, theta for JumpReLU, W_dec)."""
    W_enc, W_dec, code, device = bw.W_enc, bw.W_dec, bw.code, bw.x.device
    n_latents, d_out = W_dec.shape
    entries = sort_entries_by_latent(code.indices, n_latents, segment_config(bw.mode)["BLOCK_L"])
    grad_w_enc = torch.empty_like(W_enc, memory_format=torch.preserve_format)
    grad_b_enc = torch.empty(n_latents, dtype=W_enc.dtype, device=device)
    grad_theta = torch.empty(n_latents, dtype=bw.theta.dtype, device=device) if bw.theta is not None else None
    grad_w_dec = torch.empty(n_latents, d_out, dtype=W_dec.dtype, device=device)
    tokens_x = marked_tokens(entries.tokens, bw.x)
    tokens_g = marked_tokens(entries.tokens, bw.g)
    sorted_gpre = grad_pre.reshape(-1)[entries.order]
    sorted_values = code.values.reshape(-1)[entries.order]
    sorted_theta = theta_terms.reshape(-1)[entries.order] if bw.theta is not None else None
    return _LatentReductions(entries, tokens_x, tokens_g, sorted_gpre, sorted_values, sorted_theta,
                             grad_w_enc, grad_b_enc, grad_theta, grad_w_dec)


def _dense_rows_grads(bw: _Backward, grad_x: torch.Tensor | None, sums: _LatentReductions | None,
                      workspace_elements: int) -> None:
    """The dense rows, chunk by chunk of latents through fixed-size [N, W] workspaces: each chunk's gradients
    into the workspaces (_dense_grad_chunk), then grad_x's dense rows from them (when grad_x is asked for) and
    the per-latent reductions over the chunk's latents, sparse entries and dense rows (when sums is)."""
    x = bw.x
    n_tokens, d_in = x.shape
    n_latents = bw.W_dec.shape[0]
    device = x.device
    width = dense_chunk_width(n_tokens, n_latents, workspace_elements)
    gpre_ws = torch.empty(n_tokens, width, dtype=x.dtype, device=device)
    code_ws = torch.empty(n_tokens, width, dtype=x.dtype, device=device)
    theta_ws = torch.empty(n_tokens, width, dtype=torch.float32, device=device) if bw.theta is not None else None
    several = n_latents > width
    gx_acc = torch.empty(n_tokens if several and grad_x is not None else 1, d_in, dtype=torch.float32, device=device)
    for chunk_start in range(0, n_latents, width):
        chunk_width = min(width, n_latents - chunk_start)
        _dense_grad_chunk(bw, gpre_ws, code_ws, theta_ws, chunk_start, chunk_width)
        if grad_x is not None:
            _dense_rows_grad_x(bw, gpre_ws, gx_acc, grad_x, chunk_start, chunk_width,
                               last=chunk_start + width >= n_latents)
        if sums is not None:
            _latent_chunk_grads(bw, sums, gpre_ws, code_ws, theta_ws, chunk_start, chunk_width)


def _dense_grad_chunk(bw: _Backward, gpre_ws, code_ws, theta_ws, chunk_start: int, chunk_width: int) -> None:
    """For the chunk's latents of the dense rows: the pre-activations' gradient into gpre_ws, the code into code_ws
    and (JumpReLU) the threshold's terms into theta_ws."""
    x, W_enc, W_dec, g = bw.x, bw.W_enc, bw.W_dec, bw.g
    d_in = x.shape[1]
    n_latents, d_out = W_dec.shape
    jump = bw.theta is not None
    cfg = dict(_configs(x, bw.mode)[2])
    grid = (triton.cdiv(x.shape[0], cfg["BLOCK_R"]), triton.cdiv(chunk_width, cfg["BLOCK_N"]))
    _dense_grad_chunk_kernel[grid](  # theta, grad_l0, theta_ws: None for ReLU (JUMP reads them)
        x_ptr=x, w_ptr=W_enc, b_ptr=bw.b_enc, theta_ptr=bw.theta, wdec_ptr=W_dec, g_ptr=g, grad_lp_ptr=bw.grad_lp,
        grad_l0_ptr=bw.grad_l0, rows_ptr=bw.code.rows, n_rows_ptr=bw.code.n_rows,
        gpre_ws_ptr=gpre_ws, code_ws_ptr=code_ws, theta_ws_ptr=theta_ws,
        d_in=d_in, d_out=d_out, n_latents=n_latents, chunk_start=chunk_start, chunk_width=chunk_width,
        stride_xm=x.stride(0), stride_xd=x.stride(1), stride_wd=W_enc.stride(0), stride_wn=W_enc.stride(1),
        stride_wdec=W_dec.stride(0), stride_g=g.stride(0), stride_ws=gpre_ws.stride(0),
        p=float(bw.p), bandwidth=float(1.0 if bw.bandwidth is None else bw.bandwidth),
        MATMUL_MODE=bw.mode, JUMP=jump, P_ONE=bw.p == 1, D_OUT_IS_D_IN=d_out == d_in, **cfg)


def _dense_rows_grad_x(bw: _Backward, gpre_ws, gx_acc, grad_x, chunk_start: int, chunk_width: int,
                       last: bool) -> None:
    """grad_x's dense rows += the chunk's gpre_ws @ W_enc^T (accumulated in gx_acc over several chunks, written
    in x's dtype by the last)."""
    x, W_enc, code = bw.x, bw.W_enc, bw.code
    n_tokens, d_in = x.shape
    cfg = dict(_configs(x, bw.mode)[3])
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_R"]), triton.cdiv(d_in, cfg["BLOCK_D"]))
    # M = W_enc^T: latent k, column c at W_enc[c, k].
    _dense_rows_matmul_kernel[grid](  # no bias, no code statistics: those pointers are None
        ws_ptr=gpre_ws, m_ptr=W_enc, bias_ptr=None, acc_ptr=gx_acc, out_ptr=grad_x, rows_ptr=code.rows,
        n_rows_ptr=code.n_rows, lp_ptr=None, l0_ptr=None,
        d=d_in, n_latents=bw.W_dec.shape[0], chunk_start=chunk_start, chunk_width=chunk_width,
        stride_ws=gpre_ws.stride(0), stride_mk=W_enc.stride(1), stride_md=W_enc.stride(0),
        stride_acc=gx_acc.stride(0), stride_out=grad_x.stride(0), p=float(bw.p),
        MATMUL_MODE=bw.mode, FIRST=chunk_start == 0, LAST=last, HAS_BIAS=False,
        CODE_STATS=False, P_ONE=True, **cfg)


def _latent_chunk_grads(bw: _Backward, sums: _LatentReductions, gpre_ws, code_ws, theta_ws, chunk_start: int,
                        chunk_width: int) -> None:
    """The per-latent gradients of the chunk's latents, over the sparse entries (sums) and the dense rows (the
    workspaces): W_enc's, b_enc's and (JumpReLU) theta's, then W_dec's."""
    x, g, code = bw.x, bw.g, bw.code
    d_in = x.shape[1]
    n_latents, d_out = bw.W_dec.shape
    grad_w_enc, grad_w_dec = sums.grad_w_enc, sums.grad_w_dec
    cfg = dict(segment_config(bw.mode))
    first_block = chunk_start // cfg["BLOCK_L"]
    # Encoder: B = x [N, d_in], weights = the pre-activations' gradient; bias and threshold too.
    grid = (triton.cdiv(chunk_width, cfg["BLOCK_L"]), triton.cdiv(d_in, cfg["BLOCK_D"]))
    _latent_chunk_grad_kernel[grid](  # the threshold's pointers: None for ReLU (WRITE_THETA)
        rows_ptr_b=x, tok_ptr=sums.tokens_x, lat_ptr=sums.entries.latents, weight_ptr=sums.sorted_gpre,
        block_start_ptr=sums.entries.block_start, grad_w_ptr=grad_w_enc, grad_b_ptr=sums.grad_b_enc,
        theta_weight_ptr=sums.sorted_theta, grad_theta_ptr=sums.grad_theta, dense_rows_ptr=code.rows,
        n_dense_rows_ptr=code.n_rows, ws_ptr=gpre_ws, theta_ws_ptr=theta_ws,
        d=d_in, n_latents=n_latents, first_block=first_block, chunk_start=chunk_start,
        stride_bm=x.stride(0), stride_bd=x.stride(1), stride_gwd=grad_w_enc.stride(0),
        stride_gwn=grad_w_enc.stride(1), stride_ws=gpre_ws.stride(0),
        MATMUL_MODE=bw.mode, WRITE_BIAS=True, WRITE_THETA=bw.theta is not None, num_stages=SEGMENT_NUM_STAGES,
        **cfg)
    # Decoder: B = grad_out [N, d_out], weights = the code.
    grid = (triton.cdiv(chunk_width, cfg["BLOCK_L"]), triton.cdiv(d_out, cfg["BLOCK_D"]))
    _latent_chunk_grad_kernel[grid](  # no bias, no threshold: those pointers are None
        rows_ptr_b=g, tok_ptr=sums.tokens_g, lat_ptr=sums.entries.latents, weight_ptr=sums.sorted_values,
        block_start_ptr=sums.entries.block_start, grad_w_ptr=grad_w_dec, grad_b_ptr=None,
        theta_weight_ptr=None, grad_theta_ptr=None, dense_rows_ptr=code.rows,
        n_dense_rows_ptr=code.n_rows, ws_ptr=code_ws, theta_ws_ptr=None,
        d=d_out, n_latents=n_latents, first_block=first_block, chunk_start=chunk_start,
        stride_bm=g.stride(0), stride_bd=g.stride(1), stride_gwd=grad_w_dec.stride(1),
        stride_gwn=grad_w_dec.stride(0), stride_ws=code_ws.stride(0),
        MATMUL_MODE=bw.mode, WRITE_BIAS=False, WRITE_THETA=False, num_stages=SEGMENT_NUM_STAGES, **cfg)


class ReLUAutoencodeTriton(torch.autograd.Function):
    """fastsae.ops.relu_autoencode on the kernels above; matches ReLUAutoencodeReference."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, theta, bandwidth, p, workspace_elements):
        recon, lp_sum, l0, fire_counts, code = relu_autoencode_forward(x, W_enc, b_enc, W_dec, b_dec, theta, bandwidth, p,
                                                                 workspace_elements)
        ctx.save_for_backward(x, W_enc, b_enc, W_dec, theta, code.values, code.indices, code.band, code.slots,
                              code.dense, code.rows, code.n_rows)
        ctx.bandwidth, ctx.p, ctx.workspace_elements = bandwidth, p, workspace_elements
        ctx.mark_non_differentiable(fire_counts)
        if theta is None:
            ctx.mark_non_differentiable(l0)  # a ReLU's L0 has no gradient
        return recon, lp_sum, l0, fire_counts

    @staticmethod
    def backward(ctx, grad_recon, grad_lp, grad_l0, _grad_fire_counts):
        x, W_enc, b_enc, W_dec, theta, values, indices, band, slots, dense, rows, n_rows = ctx.saved_tensors
        code = CompactCode(values, indices, band, slots, dense, rows, n_rows)
        needs = ctx.needs_input_grad[:6]
        grads = relu_autoencode_backward(grad_recon, grad_lp, grad_l0, x, W_enc, b_enc, W_dec, theta, ctx.bandwidth,
                                         ctx.p, code, needs, ctx.workspace_elements)
        return (*grads, None, None, None)


def relu_autoencode_triton(x2d, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, p, workspace_elements):
    """The fused op on validated inputs: x2d [N, d_in] (N > 0) contiguous, W_enc [d_in, n] latent-major,
    W_dec [n, d_out] row-major, b_dec [d_out], all one dtype (fp32 / fp16 / bf16). workspace_elements: the budget of
    each dense-row workspace ([N, W] elements at most, see dense_chunk_width). Returns
    (reconstruction, lp_sum, l0, fire_counts) as fastsae.ops.relu_autoencode documents them."""
    return ReLUAutoencodeTriton.apply(x2d, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, p, workspace_elements)
