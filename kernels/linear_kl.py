"""Fused unembedding + KL(p_orig || p_sae) over the vocabulary, without the [N, V] logits.

p_orig = softmax(A), A = cap(h_orig @ W_U + b_U), the frozen model; p_sae = softmax(B),
B = cap(h_sae @ W_U + b_U), the model with the SAE spliced in; cap(z) = c * tanh(z / c) for models
with final-logit soft-capping (Gemma-2: c = 30), the identity otherwise. Per token

    KL = sum_v p_v (A_v - B_v) - lse(A) + lse(B) = dlse - E_p[D],   D = B - A, dlse = lse(B) - lse(A).

Numerics (the reason for the D form). The SAE run's logits are never formed from h_sae: the kernels
read h_orig and delta = h_sae - h_orig and build a = h_orig @ W_U + b_U and d = delta @ W_U in the
same tile loop (one W_U tile serves both products). d is the small difference the KL depends on;
as its own product it keeps its relative precision on tensor cores (TF32 / bf16 operands round
delta relative to delta, not to h) and under a large common logit bias. b_U is read in fp32 with
-inf entries (a masked vocabulary) raised to a finite floor, and without a cap it is first
shifted by its maximum (kernels/_logits.prepared_bias; softmax, KL, CE and argmax are unchanged by
a common shift, and the shift is exact), so a +1e4 bias does not round the logits to 1e-3. With a cap, D is the exact
difference of the capped logits, c * [tanh((a + d) / c) - tanh(a / c)], computed as
c * tanh(d/c) sech^2(a/c) / (1 + tanh(a/c) tanh(d/c)) (no cancellation) where |d| < c / 2.
The online log-sum-exp of B uses exp((A - m_B) + D), and dlse is merged as
(m_B - m_A) + log(s_B) - log(s_A): no step subtracts two large rounded logits. h_sae == h_orig
gives delta = 0, D = 0, and exactly 0 loss and 0 gradient.

Forward (`_linear_kl_forward_kernel`): one program per (block of BLOCK_N tokens, slice of the
vocabulary). It walks its slice in BLOCK_V tiles and keeps per row the online lse of A and of B,
the p-weighted sum of D, the running argmax of A and B, and the label's logits; a tiny torch
epilogue merges the slices (flash-decoding style). Slicing the vocabulary gives the GPU enough
programs when N is small.

Gradient (`_linear_kl_grad_kernel`): d KL / d h_sae = ((q - p) * cap'(b)) @ W_U^T times the token's
weight, with q - p = p * expm1(D - dlse) (a Taylor series where |D - dlse| < 1/4, so small
differences are not lost). A second sweep recomputes the tiles: one program per (row block,
vocabulary slice) forms the (q - p) tiles of V_GROUP vocabulary tiles in registers (2 on sm_90,
1 on sm_80, where registers are scarcer) and adds their product with W_U^T to the fp32
[BLOCK_N, d] gradient block in one write-back per group, so the block is rewritten V / (V_GROUP *
BLOCK_V) times instead of once per tile (a plain read-modify-write when one slice covers the
vocabulary; relaxed atomic adds, RED without memory fences, when several slices share rows).
Cut Cross-Entropy's filter: a group whose |q - p| (after the cap's slope) is below filter_eps
everywhere is skipped. Error bound: each skipped entry is below filter_eps, so for token i and
model dimension k the gradient changes by at most
    token_weight_i * filter_eps * sum_{v skipped} |W_U[k, v]|  <=  token_weight_i * filter_eps * ||W_U[k, :]||_1.
FILTER_EPS (2^-30, about 1e-9) is the default: at V = 50,257 and |W_U| <= 0.1 that bounds the
change by 5e-6 * token_weight per element, below TF32's rounding of the product; it skips the
tiles of tokens the model rules out (probabilities under 1e-9 in both runs).

Matmul precision: fp32 operands follow torch.get_float32_matmul_precision() through
kernels._common.mma (TF32 tensor cores when it is "high", as the trainer sets on CUDA).

Cost (GUIDE section 5): forward 4*N*d*V FLOPs (two products), gradient 6*N*d*V (two products
again + the product with W_U^T; less where the filter skips). ``grad_in_forward=True`` runs the
gradient sweep in the forward for scalar reductions; by default it runs in backward (a
forward-only call, e.g. evaluation, costs 4*N*d*V and holds no [N, d] gradient).

Memory layout: W_U with a row stride that is not a multiple of 16 elements (GPT-2's V = 50,257,
row-major) loses the vectorised, pipelined tile loads; such a W_U is copied once into a padded
buffer (`padded_unembedding`), cached while W_U is unchanged (W_U is frozen). Masked tokens are
never read: their rows load as zeros, so a masked token with a NaN hidden state gives finite
loss and gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import CompileCase, matmul_mode, mma
from fastsae.kernels._logits import prepared_bias

# The forward kernel writes, per vocabulary slice and token, N_STATS fp32 numbers in this order:
# m_orig, s_orig, t_delta, m_sae, s_sae, label_orig, label_sae  ->  stats [N_STATS, n_slices, N].
N_STATS = 7
# Cut Cross-Entropy's gradient filter: skip a group of vocabulary tiles whose |q - p| is below this
# everywhere (error bound in the module docstring). 0 disables it.
FILTER_EPS = 2.0**-30
# Vocabulary tiles whose gradient products are summed before one write-back of the [BLOCK_N, d]
# gradient block (1 or 2; kernel_config uses 1 on sm_80).
GRAD_V_GROUP = 2


# ----------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tanh_sech2(x):
    """(tanh(x), sech(x)^2) to fp32 precision for all x: Taylor below |x| = 1/4, where the exp
    form 1 - 2 / (e^2x + 1) would cancel; sech^2 = 4e / (1 + e)^2 with e = exp(-2|x|) <= 1."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    large = (1.0 - e) / (1.0 + e)
    t = tl.where(ax < 0.25, series, tl.where(x < 0, -large, large))
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _softcap_tiles(a, d, softcap):
    """Capped logits: (cap(a), cap(a + d) - cap(a), cap'(a + d)) with cap(z) = c tanh(z / c).

    The difference uses tanh(x + y) - tanh(x) = tanh(y) sech^2(x) / (1 + tanh(x) tanh(y)) where
    |d| < c / 2 (the denominator stays above 0.53), so a small d keeps its relative precision.
    """
    inv = 1.0 / softcap
    t_a, sech2_a = _tanh_sech2(a * inv)
    t_d, _ = _tanh_sech2(d * inv)
    t_b, sech2_b = _tanh_sech2((a + d) * inv)
    near = tl.abs(d) < 0.5 * softcap
    diff = tl.where(near, softcap * t_d * sech2_a / (1.0 + t_a * t_d), softcap * (t_b - t_a))
    return softcap * t_a, diff, sech2_b


@triton.jit
def _logit_tiles(h_ptr, dh_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, w_ok, d_model, softcap,
                 stride_hn, stride_hd, stride_wd, stride_wv,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr):
    """(A, D, slope) tiles, fp32: A the clean run's (capped) logits, D = B - A, slope = cap'(b)
    at the SAE run's logits (1 without a cap). Columns past the slice are A = -inf, D = 0.
    Rows with row_ok False (past N, or masked) are never read: they load as zeros. W_U's columns
    load where w_ok: col_ok widened to W_U's zero padding (a 16-aligned bound keeps the loads
    vectorised)."""
    a = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    d = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_D)
    # Pointer tiles built once and advanced by a scalar step (int64: far rows / columns stay
    # addressable): per-iteration int64 address math would hold two registers per element.
    h_offsets = rows.to(tl.int64)[:, None] * stride_hn + ks[None, :] * stride_hd
    h_ptrs = h_ptr + h_offsets
    dh_ptrs = dh_ptr + h_offsets
    w_ptrs = w_ptr + ks.to(tl.int64)[:, None] * stride_wd + cols.to(tl.int64)[None, :] * stride_wv
    h_step = tl.full((), BLOCK_D, tl.int64) * stride_hd
    w_step = tl.full((), BLOCK_D, tl.int64) * stride_wd
    for k0 in range(0, d_model, BLOCK_D):
        k_ok = (k0 + ks) < d_model
        h_mask = row_ok[:, None] & k_ok[None, :]
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)
        dh = tl.load(dh_ptrs, mask=h_mask, other=0.0)
        # One W_U tile serves both products: the main memory traffic is W_U, read once per sweep.
        w = tl.load(w_ptrs, mask=k_ok[:, None] & w_ok[None, :], other=0.0)
        a = mma(h, w, a, MATMUL_MODE)
        d = mma(dh, w, d, MATMUL_MODE)
        h_ptrs += h_step
        dh_ptrs += h_step
        w_ptrs += w_step
    if HAS_BIAS:
        a += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        a, d, slope = _softcap_tiles(a, d, softcap)
    else:
        slope = a  # unused without a cap (the compiler drops it)
    a = tl.where(col_ok[None, :], a, float("-inf"))
    d = tl.where(col_ok[None, :], d, 0.0)
    return a, d, slope


@triton.jit
def _dlogit_tile(h_ptr, dh_ptr, w_ptr, b_ptr, lse, dlse, rows, row_ok, cols, col_ok, w_ok, d_model, softcap,
                 stride_hn, stride_hd, stride_wd, stride_wv,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr):
    """d KL / d (uncapped SAE logits) on one tile: (q - p) * cap'(b), fp32; 0 past the slice.

    q - p = p * (exp(D - dlse) - 1), with a Taylor series for expm1 where |D - dlse| < 1/4 (a
    small difference keeps its precision); elsewhere exp(la + x) - p (p may underflow there
    while q does not)."""
    a, d, slope = _logit_tiles(h_ptr, dh_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, w_ok, d_model, softcap,
                               stride_hn, stride_hd, stride_wd, stride_wv,
                               HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, MATMUL_MODE)
    log_p = a - lse[:, None]  # -inf past the slice: p = 0 there
    x = d - dlse[:, None]
    p = tl.exp(log_p)
    small = tl.abs(x) < 0.25
    xs = tl.where(small, x, 0.0)
    expm1 = xs * (1.0 + xs * (0.5 + xs * (1.0 / 6.0 + xs * (1.0 / 24.0 + xs * (1.0 / 120.0 + xs * (
        1.0 / 720.0 + xs * (1.0 / 5040.0)))))))
    dlogits = tl.where(small, p * expm1, tl.exp(log_p + x) - p)
    if SOFTCAP:
        dlogits = dlogits * slope
    return dlogits


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _linear_kl_forward_kernel(
    h_ptr, dh_ptr, w_ptr, b_ptr, mask_ptr, labels_ptr, stats_ptr, argmax_ptr,
    n_tokens, d_model, d_vocab, w_cols, tiles_per_slice, softcap,
    stride_hn, stride_hd, stride_wd, stride_wv,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr,
):
    """Per (row block, vocabulary slice): online lse of A and B, p-weighted sum of D, argmax of A
    and B, label logits. Writes stats[:, slice, rows] and argmax[:, slice, rows]."""
    row_block = tl.program_id(0)
    vocab_slice = tl.program_id(1)
    n_slices = tl.num_programs(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    if HAS_MASK:  # masked tokens are never read (a NaN hidden state there stays out)
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)

    m_orig = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_sae = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_orig = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_sae = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_delta = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_v exp(A_v - m_orig) * D_v
    top_orig = tl.zeros((BLOCK_N,), dtype=tl.int32)
    top_sae = tl.zeros((BLOCK_N,), dtype=tl.int32)
    label_orig = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_sae = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = vocab_slice * tiles_per_slice * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_slice * BLOCK_V, d_vocab)
    w_end = tl.minimum(v_begin + tiles_per_slice * BLOCK_V, w_cols)  # W_U's zero padding may load
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        a, d, _ = _logit_tiles(h_ptr, dh_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, cols < w_end, d_model, softcap,
                               stride_hn, stride_hd, stride_wd, stride_wv,
                               HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, MATMUL_MODE)
        b = a + d  # the SAE run's logits: for the max and the argmax only

        # Running argmax: strict > keeps the first index on ties, like torch.argmax.
        tile_max_orig = tl.max(a, axis=1)
        tile_max_sae = tl.max(b, axis=1)
        tile_top_orig = tl.argmax(a, axis=1, tie_break_left=True).to(tl.int32) + v0
        tile_top_sae = tl.argmax(b, axis=1, tie_break_left=True).to(tl.int32) + v0
        top_orig = tl.where(tile_max_orig > m_orig, tile_top_orig, top_orig)
        top_sae = tl.where(tile_max_sae > m_sae, tile_top_sae, top_sae)

        # Online log-sum-exp; the first tile has m = -inf and alpha = exp(-inf) = 0.
        new_m_orig = tl.maximum(m_orig, tile_max_orig)
        new_m_sae = tl.maximum(m_sae, tile_max_sae)
        alpha_orig = tl.exp(m_orig - new_m_orig)
        alpha_sae = tl.exp(m_sae - new_m_sae)
        e_orig = tl.exp(a - new_m_orig[:, None])  # 0 past the slice
        # exp(B - m): (A - m) is exact near the maximum, then the small D is added.
        e_sae = tl.exp((a - new_m_sae[:, None]) + d)
        s_orig = s_orig * alpha_orig + tl.sum(e_orig, axis=1)
        s_sae = s_sae * alpha_sae + tl.sum(e_sae, axis=1)
        t_delta = t_delta * alpha_orig + tl.sum(e_orig * d, axis=1)
        m_orig = new_m_orig
        m_sae = new_m_sae

        if HAS_LABELS:
            is_label = cols[None, :] == label[:, None]
            label_orig += tl.sum(tl.where(is_label, a, 0.0), axis=1)
            label_sae += tl.sum(tl.where(is_label, b, 0.0), axis=1)

    # int64: N_STATS * n_slices * N passes 2^31 where a caller-chosen n_slices meets a large N.
    stride_stat = n_slices.to(tl.int64) * n_tokens
    in_range = rows < n_tokens
    out = stats_ptr + vocab_slice.to(tl.int64) * n_tokens + rows
    tl.store(out + 0 * stride_stat, m_orig, mask=in_range)
    tl.store(out + 1 * stride_stat, s_orig, mask=in_range)
    tl.store(out + 2 * stride_stat, t_delta, mask=in_range)
    tl.store(out + 3 * stride_stat, m_sae, mask=in_range)
    tl.store(out + 4 * stride_stat, s_sae, mask=in_range)
    tl.store(out + 5 * stride_stat, label_orig, mask=in_range)
    tl.store(out + 6 * stride_stat, label_sae, mask=in_range)
    top = argmax_ptr + vocab_slice.to(tl.int64) * n_tokens + rows
    tl.store(top, top_orig, mask=in_range)
    tl.store(top + stride_stat, top_sae, mask=in_range)


@triton.jit
def _linear_kl_grad_kernel(
    h_ptr, dh_ptr, w_ptr, b_ptr, mask_ptr, lse_ptr, dlse_ptr, weight_ptr, grad_ptr,
    n_tokens, d_model, d_vocab, w_cols, groups_per_slice, softcap, filter_eps,
    stride_hn, stride_hd, stride_wd, stride_wv, stride_gn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, USE_ATOMICS: tl.constexpr,
    V_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    MATMUL_MODE: tl.constexpr,
):
    """grad[rows] += weight[rows] * dlogits[rows, slice] @ W_U[:, slice]^T, fp32, one write-back
    of the gradient block per group of V_GROUP vocabulary tiles."""
    row_block = tl.program_id(0)
    vocab_slice = tl.program_id(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    # A block of tokens that are all masked (padding) or have zero grad_output adds nothing.
    if tl.max(tl.abs(weight), axis=0) == 0.0:
        return
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    dlse = tl.load(dlse_ptr + rows, mask=row_ok, other=0.0)
    rows64 = rows.to(tl.int64)

    group_width = V_GROUP * BLOCK_V
    v_begin = vocab_slice * groups_per_slice * group_width
    v_end = tl.minimum(v_begin + groups_per_slice * group_width, d_vocab)
    w_end = tl.minimum(v_begin + groups_per_slice * group_width, w_cols)  # W_U's zero padding may load
    for v0 in range(v_begin, v_end, group_width):
        cols0 = v0 + tl.arange(0, BLOCK_V)
        ok0 = cols0 < v_end
        w_ok0 = cols0 < w_end
        dl0 = _dlogit_tile(h_ptr, dh_ptr, w_ptr, b_ptr, lse, dlse, rows, row_ok, cols0, ok0, w_ok0, d_model, softcap,
                           stride_hn, stride_hd, stride_wd, stride_wv,
                           HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, MATMUL_MODE)
        largest = tl.max(tl.max(tl.abs(dl0), axis=1), axis=0)
        if V_GROUP == 2:
            cols1 = cols0 + BLOCK_V
            ok1 = cols1 < v_end
            w_ok1 = cols1 < w_end
            dl1 = _dlogit_tile(h_ptr, dh_ptr, w_ptr, b_ptr, lse, dlse, rows, row_ok, cols1, ok1, w_ok1, d_model,
                               softcap, stride_hn, stride_hd, stride_wd, stride_wv,
                               HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, MATMUL_MODE)
            largest = tl.maximum(largest, tl.max(tl.max(tl.abs(dl1), axis=1), axis=0))
        # Cut Cross-Entropy's filter (bound in the module docstring). Written so that a NaN
        # (an unmasked NaN input) is not skipped but reaches the gradient.
        if not (largest < filter_eps):
            # Tensor-core operand in W_U's dtype (|q - p| <= 1, so fp16 keeps it); the token
            # weight (1/N for a mean) is applied after the product, in fp32, where it cannot underflow.
            op0 = dl0.to(w_ptr.dtype.element_ty)
            if V_GROUP == 2:
                op1 = dl1.to(w_ptr.dtype.element_ty)
            ks = tl.arange(0, BLOCK_D)
            # W_U[ks, cols] as [BLOCK_V, BLOCK_D] tiles, i.e. the tiles of W_U^T; pointer tiles
            # advanced by a scalar step, as in _logit_tiles.
            w_t = ks.to(tl.int64)[None, :] * stride_wd
            w0_ptrs = w_ptr + w_t + cols0.to(tl.int64)[:, None] * stride_wv
            if V_GROUP == 2:
                w1_ptrs = w_ptr + w_t + cols1.to(tl.int64)[:, None] * stride_wv
            g_ptrs = grad_ptr + rows64[:, None] * stride_gn + ks[None, :]
            w_step = tl.full((), BLOCK_D, tl.int64) * stride_wd
            for k0 in range(0, d_model, BLOCK_D):
                k_ok = (k0 + ks) < d_model
                w0 = tl.load(w0_ptrs, mask=w_ok0[:, None] & k_ok[None, :], other=0.0)
                part = mma(op0, w0, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), MATMUL_MODE)
                if V_GROUP == 2:
                    w1 = tl.load(w1_ptrs, mask=w_ok1[:, None] & k_ok[None, :], other=0.0)
                    part = mma(op1, w1, part, MATMUL_MODE)
                    w1_ptrs += w_step
                part = part * weight[:, None]
                g_mask = row_ok[:, None] & k_ok[None, :]
                if USE_ATOMICS:  # relaxed: a plain reduction in L2, no fence per call
                    tl.atomic_add(g_ptrs, part, mask=g_mask, sem="relaxed")
                else:  # this program owns these rows: a plain read-modify-write is exact and ordered
                    tl.store(g_ptrs, tl.load(g_ptrs, mask=g_mask, other=0.0) + part, mask=g_mask)
                w0_ptrs += w_step
                g_ptrs += BLOCK_D


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def kernel_config(dtype: torch.dtype, device: torch.device, arch: int | None = None, *,
                  grad: bool = False, mode: str | None = None) -> dict:
    """Block sizes and launch options of the forward kernel (grad=False) or the gradient kernel
    (grad=True, which adds V_GROUP) for one dtype on one device.

    arch: the compute capability as 10 * major + minor (read from a CUDA device when None).
    sm_90 and later (wgmma, accumulators in registers, operands in shared memory): 64 x 128 tiles
    of a and d are 2 x 32 KiB of fp32 accumulators (8 warps: 64 registers a thread); BLOCK_D 64
    for 16-bit inputs, 32 for fp32; three pipeline stages; the gradient sums V_GROUP = 2
    vocabulary tiles per write-back. sm_80 (mma.sync holds its operands in registers too): 64 x 64
    tiles for the forward and 32 x 64 tiles (BLOCK_D 32, 8 warps), one per write-back, for the
    gradient, the largest that compile without spills.
    mode: the MATMUL_MODE (matmul_mode(dtype) when None). "ieee" (exact fp32 by request) runs on
    CUDA-core FMAs, whose operands live in registers: 32 x 64 tiles (sm_90), or 16 x 64 with
    BLOCK_D 16 and 16 x 32 for the gradient (sm_80), 4 warps.
    Compile facts: compile_cases(). Interpreter (CPU): bigger tiles mean fewer numpy steps.
    """
    if device.type != "cuda":
        config = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1, V_GROUP=GRAD_V_GROUP)
    else:
        if arch is None:
            major, minor = torch.cuda.get_device_capability(device)
            arch = 10 * major + minor
        block_d = 32 if dtype == torch.float32 else 64
        if (mode or matmul_mode(dtype)) == "ieee":
            block_n, block_v, block_d = (32, 64, 32) if arch >= 90 else (16, 32, 32) if grad else (16, 64, 16)
            config = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=4, num_stages=3, V_GROUP=1)
        elif arch >= 90:
            config = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=block_d, num_warps=8, num_stages=3, V_GROUP=GRAD_V_GROUP)
        elif grad:
            config = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3, V_GROUP=1)
        else:
            config = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=block_d, num_warps=8, num_stages=3)
    if not grad:
        config.pop("V_GROUP", None)
    return config


def _vocab_slices(n_row_blocks: int, n_vocab_tiles: int, device: torch.device,
                  n_slices: int | None) -> tuple[int, int]:
    """(tiles per slice, slices): enough programs for two waves over the GPU's SMs."""
    if n_slices is None:
        if device.type == "cuda":
            target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
            n_slices = -(-target // max(1, n_row_blocks))  # N = 0 has no row blocks
        else:
            n_slices = 1
    n_slices = max(1, min(n_slices, n_vocab_tiles))
    tiles_per_slice = -(-n_vocab_tiles // n_slices)
    return tiles_per_slice, -(-n_vocab_tiles // tiles_per_slice)  # no empty slice


# One cached padded copy of a frozen W_U: (key, the source tensor, the padded view).
_PADDED_UNEMBEDDING: list = []


def padded_unembedding(W_U: torch.Tensor) -> torch.Tensor:
    """W_U itself, or, for a row-major W_U whose row stride is not a multiple of 16 elements, an
    equal [d, V] view of a buffer with rows zero-padded to a multiple of 16 (vectorised, pipelined
    tile loads; see loadable_columns).

    W_U is frozen, so the copy is made once and cached, keyed on the tensor's data_ptr, version
    counter (bumped by any in-place write), shape, strides, dtype and device. The cache holds a
    reference to the source, so its memory cannot be reused by another tensor while the key
    lives. One entry: a new W_U replaces it.
    """
    if W_U.dim() != 2 or W_U.stride(1) != 1 or W_U.stride(0) % 16 == 0 or W_U.shape[0] <= 1:
        return W_U
    key = (W_U.data_ptr(), W_U._version, tuple(W_U.shape), W_U.stride(), W_U.dtype, W_U.device)
    if _PADDED_UNEMBEDDING and _PADDED_UNEMBEDDING[0][0] == key:
        return _PADDED_UNEMBEDDING[0][2]
    d_model, d_vocab = W_U.shape
    # Zero padding: the kernels may load it (vectorised loads up to the 16-aligned width), and a
    # zero W_U column adds nothing to any product.
    padded = W_U.new_zeros(d_model, -(-d_vocab // 16) * 16)[:, :d_vocab]
    padded.copy_(W_U)
    _PADDED_UNEMBEDDING[:] = [(key, W_U, padded)]
    return padded


def loadable_columns(W_U: torch.Tensor) -> int:
    """How many columns of W_U the kernels may load: the 16-aligned width of a buffer made by
    padded_unembedding (its padding is zero), else W_U's own d_vocab."""
    if _PADDED_UNEMBEDDING and _PADDED_UNEMBEDDING[0][2] is W_U:
        return W_U.stride(0)
    return W_U.shape[1]


def linear_kl_forward(h_orig, delta, W_U, b_U, mask, labels, softcap=None, *, config=None, n_slices=None):
    """Run the forward kernel and merge the vocabulary slices.

    h_orig and delta = h_sae - h_orig share one layout; mask int8 [N] or None. Returns
    (kl [N], lse_orig [N], dlse [N] = lse_sae - lse_orig, top-1 agreement [N] bool, ce_orig [N],
    ce_sae [N]) in fp32; ce_* are lse - label logit (meaningless where the token has no label).
    """
    n_tokens, d_model = h_orig.shape
    d_vocab = W_U.shape[1]
    config = dict(config or kernel_config(h_orig.dtype, h_orig.device))
    config.pop("V_GROUP", None)
    n_row_blocks = triton.cdiv(n_tokens, config["BLOCK_N"])
    tiles_per_slice, slices = _vocab_slices(
        n_row_blocks, triton.cdiv(d_vocab, config["BLOCK_V"]), h_orig.device, n_slices)
    stats = torch.empty(N_STATS, slices, n_tokens, dtype=torch.float32, device=h_orig.device)
    top = torch.empty(2, slices, n_tokens, dtype=torch.int32, device=h_orig.device)
    _linear_kl_forward_kernel[(n_row_blocks, slices)](
        h_orig, delta, W_U, b_U if b_U is not None else W_U, mask if mask is not None else top,
        labels if labels is not None else top, stats, top,
        n_tokens, d_model, d_vocab, loadable_columns(W_U), tiles_per_slice, float(softcap or 1.0),
        h_orig.stride(0), h_orig.stride(1), W_U.stride(0), W_U.stride(1),
        HAS_BIAS=b_U is not None, HAS_MASK=mask is not None, HAS_LABELS=labels is not None,
        SOFTCAP=softcap is not None, MATMUL_MODE=matmul_mode(h_orig.dtype), **config)

    # Merge the slices: lse = M + log sum_s s_s exp(m_s - M); t rescales with the clean run's sums.
    m_orig, s_orig, t_delta, m_sae, s_sae, label_orig, label_sae = stats.unbind(0)
    max_orig, best_orig = m_orig.max(0)  # first slice wins ties: the lower vocabulary index
    max_sae, best_sae = m_sae.max(0)
    sum_orig = (s_orig * torch.exp(m_orig - max_orig)).sum(0)
    sum_sae = (s_sae * torch.exp(m_sae - max_sae)).sum(0)
    t_total = (t_delta * torch.exp(m_orig - max_orig)).sum(0)
    lse_orig = max_orig + torch.log(sum_orig)
    # lse_sae - lse_orig, grouped so that the large terms cancel first (exactly, when close).
    dlse = (max_sae - max_orig) + (torch.log(sum_sae) - torch.log(sum_orig))
    kl = dlse - t_total / sum_orig
    agree = top[0].gather(0, best_orig[None]).squeeze(0) == top[1].gather(0, best_sae[None]).squeeze(0)
    ce_orig = lse_orig - label_orig.sum(0)  # only the slice holding the label adds a nonzero logit
    ce_sae = max_sae + torch.log(sum_sae) - label_sae.sum(0)
    return kl, lse_orig, dlse, agree, ce_orig, ce_sae


def linear_kl_grad(h_orig, delta, W_U, b_U, mask, lse_orig, dlse, token_weight, softcap=None, *,
                   filter_eps=FILTER_EPS, config=None, n_slices=None):
    """grad_h_sae [N, d] fp32 = token_weight[:, None] * ((q - p) * cap') @ W_U^T."""
    n_tokens, d_model = h_orig.shape
    d_vocab = W_U.shape[1]
    config = dict(config or kernel_config(h_orig.dtype, h_orig.device, grad=True))
    v_group = config.pop("V_GROUP", GRAD_V_GROUP)
    n_row_blocks = triton.cdiv(n_tokens, config["BLOCK_N"])
    groups_per_slice, slices = _vocab_slices(
        n_row_blocks, triton.cdiv(d_vocab, v_group * config["BLOCK_V"]), h_orig.device, n_slices)
    grad = torch.zeros(n_tokens, d_model, dtype=torch.float32, device=h_orig.device)
    _linear_kl_grad_kernel[(n_row_blocks, slices)](
        h_orig, delta, W_U, b_U if b_U is not None else W_U, mask if mask is not None else grad,
        lse_orig.contiguous(), dlse.contiguous(), token_weight.float().contiguous(), grad,
        n_tokens, d_model, d_vocab, loadable_columns(W_U), groups_per_slice, float(softcap or 1.0), float(filter_eps),
        h_orig.stride(0), h_orig.stride(1), W_U.stride(0), W_U.stride(1), grad.stride(0),
        HAS_BIAS=b_U is not None, HAS_MASK=mask is not None, SOFTCAP=softcap is not None,
        USE_ATOMICS=slices > 1, V_GROUP=v_group, MATMUL_MODE=matmul_mode(h_orig.dtype), **config)
    return grad


# ----------------------------------------------------------------------------------------------
# Compile cases: the launchers' exact configurations (tests/compile_check.py compiles them)
# ----------------------------------------------------------------------------------------------

# (name, d_model, d_vocab, n_tokens): the GPT-2 preset (16 x 1,024 tokens) and a Llama-3-8B-sized
# model. The vocabulary size enters the specialisation only through W_U's row stride.
COMPILE_SHAPES = (("gpt2", 768, 50257, 16384), ("d4096", 4096, 128256, 16384))


def compile_cases(arch: int = 90, shapes=COMPILE_SHAPES, sm_count: int = 132) -> dict[str, CompileCase]:
    """{key: CompileCase} for every launch of this file's kernels, exactly as the launchers make
    them on CUDA sm_<arch>: kernel_config's block sizes, warps and stages for that arch; the
    constexprs; the arguments a launch passes (W_U row-major after `padded_unembedding`, h and
    delta contiguous, a mask, labels, a bias), so Triton's 16-divisibility / unit-stride
    specialisation is the launch's; the slice count for ``sm_count`` SMs (132: H100 / H200), which
    decides USE_ATOMICS.

    Keys: f"{kernel}-{shape}-{mode}", kernel "kl_fwd" / "kl_grad", shape a COMPILE_SHAPES name,
    mode "bf16" (bf16 inputs), "tf32" (fp32 inputs, TF32 tensor cores: the trainer's default) and
    "ieee" (fp32 FMA, by request). bf16 and tf32 are hot: they must compile to tensor-core MMAs
    with pipelined loads and no spills.
    """
    cases = {}
    for name, d_model, d_vocab, n_tokens in shapes:
        w_row_stride = -(-d_vocab // 16) * 16  # padded_unembedding
        for mode, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32), ("ieee", torch.float32)):
            matmul = "tf32" if mode == "bf16" else mode  # matmul_mode(): 16-bit inputs get "tf32"
            common = dict(h_ptr=dtype, dh_ptr=dtype, w_ptr=dtype, b_ptr=dtype, mask_ptr=torch.int8,
                          n_tokens=n_tokens, d_model=d_model, d_vocab=d_vocab, w_cols=w_row_stride, softcap=1.0,
                          stride_hn=d_model, stride_hd=1, stride_wd=w_row_stride, stride_wv=1)
            flags = dict(HAS_BIAS=True, HAS_MASK=True, SOFTCAP=False, MATMUL_MODE=matmul)
            for grad in (False, True):
                config = kernel_config(dtype, torch.device("cuda"), arch, grad=grad, mode=matmul)
                launch = dict(num_warps=config.pop("num_warps"), num_stages=config.pop("num_stages"),
                              hot=mode != "ieee")
                n_row_blocks = triton.cdiv(n_tokens, config["BLOCK_N"])
                tile = config.get("V_GROUP", 1) * config["BLOCK_V"]
                per_slice, slices = _vocab_slices_for(n_row_blocks, triton.cdiv(d_vocab, tile), sm_count)
                if not grad:
                    cases[f"kl_fwd-{name}-{mode}"] = _CompileCase(
                        _linear_kl_forward_kernel,
                        dict(common, labels_ptr=torch.int64, stats_ptr=torch.float32, argmax_ptr=torch.int32,
                             tiles_per_slice=per_slice),
                        dict(config, **flags, HAS_LABELS=True), **launch)
                else:
                    cases[f"kl_grad-{name}-{mode}"] = _CompileCase(
                        _linear_kl_grad_kernel,
                        dict(common, lse_ptr=torch.float32, dlse_ptr=torch.float32, weight_ptr=torch.float32,
                             grad_ptr=torch.float32, groups_per_slice=per_slice, filter_eps=FILTER_EPS,
                             stride_gn=d_model),
                        dict(config, **flags, USE_ATOMICS=slices > 1), **launch)
    return cases


class _CompileCase(CompileCase):
    """A CompileCase that also takes float example values, standing for fp32 scalar arguments
    (softcap, filter_eps; a launch never specialises them), and torch.int8 for the mask pointer."""

    def signature_and_specialisation(self) -> tuple[dict, dict, dict]:
        floats = [name for name, value in self.args.items() if isinstance(value, float)]
        int8 = [name for name, value in self.args.items() if value is torch.int8]
        args = self.args
        self.args = {name: 2 if name in floats else torch.int32 if name in int8 else value
                     for name, value in args.items()}
        try:
            signature, constexprs, attrs = super().signature_and_specialisation()
        finally:
            self.args = args
        signature.update({name: "fp32" for name in floats})  # 2: no constant, no divisibility attr
        signature.update({name: "*i8" for name in int8})  # a pointer: 16-divisible like the others
        return signature, constexprs, attrs


def _vocab_slices_for(n_row_blocks: int, n_vocab_tiles: int, sm_count: int) -> tuple[int, int]:
    """_vocab_slices' CUDA choice for a device with sm_count SMs (no device needed)."""
    n_slices = -(-2 * sm_count // max(1, n_row_blocks))
    return _vocab_slices(n_row_blocks, n_vocab_tiles, torch.device("cpu"), n_slices)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class LinearKLFunction(torch.autograd.Function):
    """(loss, sums) with the reference's contract; differentiable in h_sae only."""

    @staticmethod
    def forward(ctx, h_sae, h_orig, W_U, b_U, mask, labels, reduction, ignore_index, softcap,
                grad_in_forward, filter_eps, config, n_slices):
        n_tokens = h_sae.shape[0]
        counted = torch.ones(n_tokens, dtype=torch.bool, device=h_sae.device) if mask is None else mask
        maskf = counted.float()
        n_counted = maskf.sum()
        token_weight = maskf / n_counted.clamp_min(1.0) if reduction == "mean" else maskf
        # The kernels read h_orig and the difference (module docstring: Numerics), one layout.
        delta = (h_sae.detach() - h_orig).contiguous()
        h_orig = h_orig.contiguous()
        mask8 = None if mask is None else mask.to(torch.int8)
        W_U = padded_unembedding(W_U)
        b_U = prepared_bias(b_U, softcap)  # fp32, unit stride, -inf floored, shifted when uncapped

        kl, lse_orig, dlse, agree, ce_orig, ce_sae = linear_kl_forward(
            h_orig, delta, W_U, b_U, mask8, labels, softcap, config=config, n_slices=n_slices)
        kl = torch.where(counted, kl, 0.0)

        # [ce_orig sum, ce_sae sum, labelled tokens, top-1 agreements, counted tokens]
        sums = torch.zeros(5, dtype=torch.float32, device=h_sae.device)
        if labels is not None:
            has_label = counted & (labels != ignore_index)
            sums[0] = torch.where(has_label, ce_orig, 0.0).sum()
            sums[1] = torch.where(has_label, ce_sae, 0.0).sum()
            sums[2] = has_label.sum()
        sums[3] = (agree & counted).sum()
        sums[4] = n_counted

        ctx.reduction, ctx.h_dtype, ctx.softcap = reduction, h_sae.dtype, softcap
        ctx.filter_eps, ctx.config, ctx.n_slices = filter_eps, config, n_slices
        ctx.grad_in_forward = False
        grad_args = (h_orig, delta, W_U, b_U, mask8, lse_orig, dlse)
        if reduction == "none":
            loss = kl
        else:
            loss = (kl * token_weight).sum() if reduction == "mean" else kl.sum()
            if grad_in_forward and ctx.needs_input_grad[0]:
                ctx.grad_in_forward = True
                ctx.save_for_backward(linear_kl_grad(*grad_args, token_weight, softcap, filter_eps=filter_eps,
                                                     config=config, n_slices=n_slices))
        if not ctx.grad_in_forward:
            ctx.save_for_backward(*grad_args, token_weight)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        if not ctx.needs_input_grad[0]:
            return (None,) * 13
        if ctx.grad_in_forward:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_loss
        else:
            *grad_args, token_weight = ctx.saved_tensors
            # scalar reductions: one grad_output for all tokens; "none": one per token.
            grad = linear_kl_grad(*grad_args, token_weight * grad_loss.float(), ctx.softcap,
                                  filter_eps=ctx.filter_eps, config=ctx.config, n_slices=ctx.n_slices)
        return (grad.to(ctx.h_dtype),) + (None,) * 12


def linear_kl_triton(h_sae, h_orig, W_U, b_U=None, mask=None, labels=None, reduction="mean",
                     ignore_index=-100, softcap=None, *, grad_in_forward=False, filter_eps=FILTER_EPS,
                     config=None, n_slices=None):
    """Fused linear + KL on validated, flattened inputs: h_* [N, d], W_U [d, V], b_U [V] or None,
    mask [N] bool or None, labels [N] int64 or None, softcap a positive float or None (final-logit
    soft-capping). Returns (loss, sums) like the reference.

    grad_in_forward: compute the gradient in the forward (scalar reductions only; same FLOPs).
    filter_eps: the gradient filter's threshold (module docstring; 0 disables it).
    config / n_slices: override the block sizes and the number of vocabulary slices (tests).
    """
    if h_sae.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton linear-KL kernel takes float32/float16/bfloat16 inputs, got {h_sae.dtype}; "
                        "use backend='torch' for float64")
    if W_U.dtype != h_sae.dtype or (b_U is not None and b_U.dtype != h_sae.dtype):
        raise TypeError("h_sae, h_orig, W_U and b_U must share one dtype")
    if labels is not None:
        labels = labels.long().contiguous()
    if mask is not None:
        mask = mask.bool()
    return LinearKLFunction.apply(h_sae, h_orig.detach(), W_U.detach(), None if b_U is None else b_U.detach(),
                                  mask, labels, reduction, ignore_index, None if softcap is None else float(softcap),
                                  grad_in_forward, filter_eps, config, n_slices)
