"""Tiles several kernels share: the encoder GEMM tile, the grouped program order, the dense-row
opening and the segmented sum by latent. Each op's file (kernels/<op>.py) imports its pieces from
here and from kernels/_sparse_code.py, never from another op's file.

These are @triton.jit device functions: Triton inlines them into every kernel that calls them, so
a kernel compiles exactly as if it held the code itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import mma


@triton.jit
def matmul_tile(
    a_ptr, b_ptr, rows, cols, row_ok, col_ok, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MATMUL_MODE: tl.constexpr,
):
    """a[rows, :K] @ b[:K, cols]: one [BLOCK_M, BLOCK_N] fp32 tile, rows and cols any index vectors.

    A tl.dot over K in steps of BLOCK_K, fp32 accumulation (operands as MATMUL_MODE says,
    kernels/_common.py); masked rows / columns read 0. rows may be a gathered list of row ids (the
    ReLU autoencoder's dense rows), so both operands are addressed through their index vectors.

    Offsets are int64: rows * stride_am passes 2^31 at 524,288 tokens of d = 4,096, and K *
    n_latents at wide dictionaries (either operand may also be column-major, so both index
    vectors of each operand are widened). Only the 1-D index vectors are cast; the 2-D pointer
    tiles are 64-bit whatever the offset type.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + offs_k
        ks64 = ks.to(tl.int64)
        a_tile = tl.load(a_rows + ks64[None, :] * stride_ak,
                         mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
        b_tile = tl.load(b_cols + ks64[:, None] * stride_bk,
                         mask=(ks[:, None] < K) & col_ok[None, :], other=0.0)
        acc = mma(a_tile, b_tile, acc, MATMUL_MODE)
    return acc


@triton.jit
def encoder_preactivation_tile(
    x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, d_in,
    stride_xm, stride_xd, stride_wd, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr,
):
    """x[rows] @ W_enc[:, cols] + b_enc[cols]: one [BLOCK_M, BLOCK_N] fp32 tile of pre-activations.

    matmul_tile over d_in plus the bias. Shared by the TopK encoder's forward, the ReLU encoder's
    (kernels/relu_encoder.py) and the ReLU autoencoder's (kernels/relu_autoencoder.py).

    E2ESAE stores W_enc as an [n_latents, d_in] buffer seen through its transpose, so here
    stride_wd == 1 (a launch turns it into a constant): the [BLOCK_D, BLOCK_N] W tile is the
    K-major B operand that wgmma / mma read from shared memory as they are, each latent's BLOCK_D
    weights one contiguous vectorised read. Any other strides are correct too.
    """
    acc = matmul_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, d_in, stride_xm, stride_xd, stride_wd, stride_wn,
                      BLOCK_M, BLOCK_N, BLOCK_D, MATMUL_MODE)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return acc + bias[None, :]



@triton.jit
def grouped_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n): the [BLOCK_M, BLOCK_N] tile of program ``pid`` in a 1-D grid, in grouped order.

    GROUP_M row blocks sweep the column blocks together, so programs running side by side share
    their operand tiles in L2: a W_enc tile is read from DRAM once per group of row blocks rather
    than once per row block (Triton's matmul tutorial calls it the L2 swizzle).
    """
    n_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    n_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    programs_per_group = GROUP_M * n_col_blocks
    group = pid // programs_per_group
    first_row_block = group * GROUP_M
    group_size = tl.minimum(n_row_blocks - first_row_block, GROUP_M)
    pid_m = first_row_block + (pid % programs_per_group) % group_size
    pid_n = (pid % programs_per_group) // group_size
    return pid_m, pid_n


# The encoder GEMM's tiles, for the ReLU encoder's kernel and the ReLU autoencoder's compacting one:
# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per input dtype; their compile facts come from
# the compile check (tests/compile_check.py). fp32 tiles are twice the bytes: half the BLOCK_D.
# 128 x 128 on 8 warps gives the wgmma accumulator warpsPerCTA [8, 1] on sm_90.
ENCODER_TILE_CONFIGS = {
    torch.float16: (128, 128, 64, 8, 3),
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float32: (128, 128, 32, 8, 3),
}
GROUP_M = 8
# The interpreter (CPU tests) pays per program and per tile op, not per element: small tiles.
INTERPRETER_ENCODER_TILE_CONFIG = (16, 32, 32, 4, 1)


@triton.jit
def dense_row_block(rows_ptr, n_rows, pid_r, BLOCK_R: tl.constexpr):
    """(slots, slot_ok, row): block pid_r of the dense rows of a capacity-bounded code.

    The dense rows (DenseRows in kernels/_sparse_code.py) are listed first in rows_ptr, n_rows of
    them, a count that stays on the device: grids are sized for every row being dense and the
    kernel opens with ``if pid_r * BLOCK_R < n_rows`` so the programs past the count exit at once.
    slots are positions in that list (the workspaces' rows), row the token ids (int32).
    """
    slots = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    slot_ok = slots < n_rows
    row = tl.load(rows_ptr + slots, mask=slot_ok, other=0)
    return slots, slot_ok, row


@triton.jit
def accumulate_latent_segment(
    acc, bias_acc, x_ptr, tok_ptr, lat_ptr, grad_ptr, entry_start, entry_end, latent0, ds64, d_ok,
    stride_xm, stride_xd,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, MATMUL_MODE: tl.constexpr, WRITE_BIAS: tl.constexpr,
):
    """acc[l] += sum of grad[e] * x[tok[e]] over the entries e in [entry_start, entry_end) of
    latent latent0 + l (entries sorted by latent); bias_acc[l] += the sum of their grad[e].

    The tile is computed latent-major, [BLOCK_L, BLOCK_D] += onehot^T @ x[tokens], where
    onehot[e, l] = grad[e] if entry e belongs to latent l: the x rows are the B operand as they
    lie in memory (d contiguous). No atomics, fp32 accumulation, deterministic.

    Non-finite x rows: the launcher stores such an entry's token as -1 - token. Its row stays out
    of the dot (where 0 * NaN would reach all BLOCK_L latents of the tile) and is added to its own
    latent alone in a second pass, grad[e] * x[t] in fp32, as the reference's scatter does.
    """
    offs_l = tl.arange(0, BLOCK_L)
    lanes = tl.arange(0, BLOCK_E)
    for e_start in range(entry_start, entry_end, BLOCK_E):
        es = e_start + lanes
        e_ok = es < entry_end
        token = tl.load(tok_ptr + es, mask=e_ok, other=0)
        latent = tl.load(lat_ptr + es, mask=e_ok, other=-1)
        weight = tl.load(grad_ptr + es, mask=e_ok, other=0.0)
        # x rows of these entries: [BLOCK_E, BLOCK_D]. int64 offsets: token * stride_xm passes
        # 2^31 at N * d >= 2^31 (and d * stride_xd for a column-major x).
        x_rows = tl.load(x_ptr + token.to(tl.int64)[:, None] * stride_xm + ds64[None, :] * stride_xd,
                         mask=(e_ok & (token >= 0))[:, None] & d_ok[None, :], other=0.0)
        # onehot_t[l, e] = weight[e] where entry e is latent0 + l: the segmented sum becomes a dot.
        # weight comes from a tensor of x's dtype, so the cast below is exact.
        hit = offs_l[:, None] == (latent - latent0)[None, :]
        onehot_t = tl.where(hit, weight[None, :], 0.0)
        acc = mma(onehot_t.to(x_rows.dtype), x_rows, acc, MATMUL_MODE)
        if WRITE_BIAS:
            bias_acc += tl.sum(onehot_t.to(tl.float32), axis=1)
    # The second pass reads only the token ids (already in cache): non-finite rows are rare.
    for e_start in range(entry_start, entry_end, BLOCK_E):
        es = e_start + lanes
        e_ok = es < entry_end
        token = tl.load(tok_ptr + es, mask=e_ok, other=0)
        bad = e_ok & (token < 0)
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            latent = tl.load(lat_ptr + es, mask=bad, other=-1)
            weight = tl.load(grad_ptr + es, mask=bad, other=0.0).to(tl.float32)
            for e in range(0, BLOCK_E):
                pick = lanes == e
                if tl.sum(tl.where(pick & bad, 1, 0), axis=0) > 0:
                    row = -1 - tl.sum(tl.where(pick, token, 0), axis=0).to(tl.int64)
                    lat = tl.sum(tl.where(pick, latent, 0), axis=0)
                    w = tl.sum(tl.where(pick, weight, 0.0), axis=0)
                    x_row = tl.load(x_ptr + row * stride_xm + ds64 * stride_xd, mask=d_ok, other=0.0)
                    acc += tl.where(offs_l[:, None] == lat - latent0, (w * x_row.to(tl.float32))[None, :], 0.0)
    return acc, bias_acc
