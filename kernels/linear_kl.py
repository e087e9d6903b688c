"""Fused unembedding + KL(p_orig || p_sae) over the vocabulary, without the [N, V] logits.

p_orig = softmax(A), A = cap(h_orig @ W_U + b_U), the frozen model; p_sae = softmax(B),
B = cap(h_sae @ W_U + b_U), the model with the SAE spliced in; cap(z) = c * tanh(z / c) for models
with final-logit soft-capping (Gemma-2: c = 30), the identity otherwise. D = B - A.

Two kernels, chosen by the autograd function at the bottom:

- `_linear_kl_forward_kernel` with WITH_GRAD=True: the training loss (reduction "mean" / "sum").
  Loss AND gradient with respect to h_sae in one sweep over W_U per token block: 8*N*d*V FLOPs
  (the two logit products, then the two products of the gradient's accumulators with W_U^T).
  The gradient is computed in the forward and backward only scales it (Liger-Kernel's trick).
- `_linear_kl_forward_kernel` with WITH_GRAD=False: the loss and stats only, 4*N*d*V (evaluation,
  reduction="none", or no gradient wanted).
- `_linear_kl_grad_kernel`: the gradient for reduction="none", whose per-token grad_output is only
  known in backward: a second sweep recomputes A and D from the forward's lse's (6*N*d*V; 10 in
  all). Scalar reductions take it only with one_sweep=False, which the op's measured dispatch
  picks where benchmarks/gpu_check.py found it faster on the GPU (see "Which is faster" below).

Numerics: the delta form. The SAE run's logits are never formed from h_sae: the kernels read
h_orig and delta = h_sae - h_orig and build a = h_orig @ W_U + b_U and d = delta @ W_U in the
same tile loop (one W_U tile serves both products). d is the small difference the KL depends on;
as its own product it keeps its relative precision on tensor cores (TF32 / bf16 operands round
delta relative to delta, not to h) and under a large common logit bias. b_U is read in fp32 with
-inf entries (a masked vocabulary) raised to a finite floor, and without a cap it is first
shifted by its maximum (kernels/_logits.prepared_bias; softmax, KL, CE and argmax are unchanged by
a common shift, and the shift is exact), so a +1e4 bias does not round the logits to 1e-3. With a
cap, D is the exact difference of the capped logits, c * [tanh((a + d) / c) - tanh(a / c)],
computed as c * tanh(d/c) sech^2(a/c) / (1 + tanh(a/c) tanh(d/c)) (no cancellation) where
|d| < c / 2. h_sae == h_orig gives delta = 0, D = 0, and exactly 0 loss and 0 gradient.
With fp16 / bf16 inputs delta is the difference rounded once to the input dtype (a tensor-core
product takes operands of that dtype; forming it in fp32 first rounds the same), where the
PyTorch reference keeps it in fp32: each logit change moves by at most u (|delta| @ |W_U|)_v
(u = 2^-8 for bf16, 2^-11 for fp16), so a token's KL by about u max_v (|delta| @ |W_U|)_v
sum_v |q_v - p_v| and the gradient by 2 u max_v (|delta| @ |W_U|)_v sum_v q_v |W_U[k, v]|, first
order (tests/test_precision.py holds the kernel to these against the reference; 1e-2 of the
loss and 5e-2 of the gradient at most in the issue that found it). Splitting delta into two bf16
parts would remove it at one more logit product (+25 % of the sweep's FLOPs): the hidden states
themselves carry bf16 rounding of that size relative to delta, so it is not done.

Elementwise work per logit in the sweep (the one-sweep kernel, no cap, with labels), counted
from the code: about 55 fp32 instructions and 2 exponentials (MUFU ex2) per (token, vocabulary
entry): bias and masks 3, the SAE logits and the four maxima / argmaxes 7, the label 6, the
centred terms 27 (the series' 9 FMAs, both exponentials' arguments, the branch selects), the four
sums 6, the filter's bound 3, the two operand casts 2. Against the 8d tensor-core FLOPs of the
logit: on an H100 SXM (989 dense bf16 TFLOP/s; 132 SMs x 128 fp32 lanes and 16 MUFU per clock
at 1.83 GHz) about 2.3 ps of elementwise work per logit beside 6.2 ps of MMA at d = 768 (the GPT-2
preset): up to a quarter of the kernel's time where the two do not overlap (the selection reads
the MMA's result, so within a program they do not; other programs on the SM fill the gap), 6 %
at d = 4,096; TF32 (fp32 inputs) halves the MMA rate, so 15 % at d = 768. An estimate from the
instruction count, not a measurement: gpu_check's timings settle it.

Numerics: the KL without cancellation (kernels/_logits.py has the derivation). With the centre
c = max(B) - max(A) and x = D - c, KL = E_p[phi(x)] + psi(u), u = E_p[expm1(x)],
phi(x) = expm1(x) - x, psi(u) = log1p(u) - u, each by its series where small: a KL of 5e-5 nats
keeps fp32's relative precision (the difference log s_B - log s_A of two log-sum-exps, the
paper's form, loses it: 3.6e-2 relative). A program keeps per row the running maxima m_A, m_B and
the scaled sums S = sum exp(A - m_A), U = sum exp(A - m_A) expm1(x), R = sum exp(A - m_A) phi(x),
T = sum exp(A - m_A) x, rescaled exactly whenever m_A or the centre moves (the factors a, b - a,
a phi(k) of _logits.rescale_factors, in _rescale_factors here). exp(A - m_A + x) = exp(B - m_B)
<= 1, so no term overflows however large the logits or D are.

The sweep in the code. Each program walks its vocabulary slice one [BLOCK_N, BLOCK_V] tile at a
time: `_logit_tiles` forms the tile's two logit products (A and D), then `_sweep_tile` moves the
program's SweepState past it (named tuples: `SliceStats`, the maxima, the four scaled sums and the
label's logits, which are also the rows of the stats the kernel writes and _merge_slices reads by
name; the centre; `Top1`, the running argmaxes) and hands back the tile's TileTerms (the
accumulators' `Rescale` factors, the weights e and e expm1(x), the filter's bounds) for the
gradient's update, `_accumulate_step`.

The gradient in one sweep. d KL / d b_v = q_v - p_v = p_v (expm1(x_v) - u) / (1 + u) (times
cap'(b_v) with a cap), so

    grad_h_sae = token_weight / (S (1 + u)) * (G1 - u G0),
    G0 = sum_v exp(A_v - m_A) cap'(b_v) W_U[:, v],   G1 = sum_v exp(A_v - m_A) expm1(x_v) cap'(b_v) W_U[:, v]

(the two expectations of W_U's columns, under p and under q - p, scaled). G0 and G1 are [BLOCK_N, d]
accumulators rescaled as the running maxima move (G0' = a G0, G1' = b G1 + (b - a) G0, as U) and
combined once u is known. G1 carries expm1(x), not exp(B - m_B): where q ~ p its entries are
small and exact, so the gradient keeps its relative precision when the KL is small (the
difference G_q - G_p of two expectations would cancel). [BLOCK_N, d] fp32 does not fit in
registers (64 x 768 x 4 B = 192 KiB; at d = 4,096 a megabyte), so each program keeps G0 and G1 in
its own slice of a global buffer and updates them once per vocabulary tile: a second d loop
reads the tile's W_U columns again (an L2 hit: the same [d, BLOCK_V] tile the logit loop just
streamed; HBM reads W_U once per token block) and read-modify-writes the two blocks (plain loads
and stores: the program owns them, no atomics). The buffer is transposed, [2, n_slices, d, N]:
the update is G^T += W_U[k-chunk, tile] @ op^T, whose operands (the [BLOCK_V, BLOCK_N] tiles of e
and e expm1(x)) are the MMA's B side, read from shared memory on sm_90, where as the A side they
would take two 64-register copies per thread and spill. A torch epilogue merges the vocabulary
slices (flash-decoding style; same rescaling) and forms the gradient.

Which is faster, one sweep or two. The sweep does 8*N*d*V FLOPs against 10, but moves more bytes
through L2 per FLOP. Per program and vocabulary tile (BLOCK_N = BLOCK_V = 64, d model width, s
bytes per operand): h and delta 2 * 64 d s, the W_U tile twice 2 * 64 d s, G0 and G1 read and
written 4 * 64 d * 4 B, for 8 * 64 * 64 d FLOPs: 21 FLOP/B in bf16, 16 in fp32. The two-pass
kernels' 64 x 128 tiles (two per write-back of their single accumulator) run at about 64 (forward)
and 48 (gradient) FLOP/B in bf16. Compute-bound, the sweep is 20 % faster; L2-bound (at a few
TB/s of L2, plausible on H100 / H200), the two-pass kernels are. The wider sweep tiles or groups
that would amortise the accumulators spill (kernel_config). This is an estimate, not a
measurement: the op's dispatch takes whichever benchmarks/gpu_check.py measured faster on the GPU
(fastsae/ops/_backend.py), the one sweep where nothing was measured.

Cut Cross-Entropy's filter in one sweep. Final p and q are not known during the sweep, but the
running maxima bound them: p_v <= exp(A_v - m_A) and q_v <= exp(B_v - m_B) at any point of the
sweep. A tile where both bounds are below filter_eps for every row (and whose rows kept their
maxima, so the accumulators need no rescale) skips the gradient products: each skipped entry has
|q - p| < filter_eps, so for token i and model dimension k the gradient changes by at most
    token_weight_i * filter_eps * sum_{v skipped} |W_U[k, v]|  <=  token_weight_i * filter_eps * ||W_U[k, :]||_1.
FILTER_EPS (2^-30, about 1e-9) is the default: at V = 50,257 and |W_U| <= 0.1 that bounds the
change by 5e-6 * token_weight per element, below TF32's rounding of the product. The bound uses
the running maxima, so it skips only tiles that come after the large logits of a row (it acts less
than a two-pass filter, never more loosely). The two-pass gradient kernel filters with the final
p and q.

Matmul precision: fp32 operands follow torch.get_float32_matmul_precision() through
kernels._common.mma (TF32 tensor cores when it is "high", as the trainer sets on CUDA: Triton
feeds fp32 registers to the .tf32 MMAs, which truncate them to 10 mantissa bits). The gradient
products take their (bounded, |.| <= 1) operands in W_U's dtype. tests/test_precision.py checks
TF32 and bf16 operands on an interpreter that rounds as the GPU does: TF32 costs 5e-4 to 2.5e-3
of the KL and 2e-3 of the gradient, bf16 operands up to 1e-2 and 7.5e-3.

Memory layout: W_U with a row stride that is not a multiple of 16 elements (GPT-2's V = 50,257,
row-major) loses the vectorised, pipelined tile loads; such a W_U is copied once into a padded
buffer (`padded_unembedding`, a fresh copy each call: never stale). A column-major W_U
(TransformerLens 4 passes lm_head.weight.T) is read as it is. Masked tokens are never read: their
rows load as zeros (a masked token with a NaN hidden state gives finite loss and gradients), and a
block of only masked tokens returns at once. Extra memory: the stats ([N_STATS = 8, n_slices, N] fp32) and,
with the gradient, G0 and G1 (2 * n_slices * N * d fp32; one slice from one row block per SM:
N = 8,448 on 132 SMs at BLOCK_N = 64).

This file is longer than the house's ~400 lines because it is one op (Liger-Kernel's rule: forward,
backward and launchers together): the one-sweep kernel, the two-pass kernels for reduction="none",
their shared online log-sum-exp helpers, configs, each commented.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import gpu_arch, matmul_mode, mma, sm_count
from fastsae.kernels._logits import KLSums, kl_from_sums, prepared_bias, rescale_factors



class SliceStats(NamedTuple):
    """What the forward kernel keeps per token of its row block over its vocabulary slice, and
    writes as the rows of stats [N_STATS, n_slices, N] fp32 in this field order; _merge_slices
    reads them back by name (SliceStats(*stats)), so the two cannot drift apart. In the kernel
    each field is a [BLOCK_N] block, on the host an [n_slices, N] tensor."""

    m_orig: torch.Tensor  # running max of A (-inf before the first tile)
    m_sae: torch.Tensor  # running max of B
    s_sum: torch.Tensor  # S = sum exp(A - m_A): the scaled sums of the module docstring
    u_sum: torch.Tensor  # U = sum exp(A - m_A) expm1(x)
    r_sum: torch.Tensor  # R = sum exp(A - m_A) phi(x)
    t_sum: torch.Tensor  # T = sum exp(A - m_A) x
    label_orig: torch.Tensor  # A at the token's label (0 in the slices without it)
    label_sae: torch.Tensor  # B at the token's label


N_STATS = len(SliceStats._fields)


class Top1(NamedTuple):
    """The running argmaxes of A and B (int32 vocabulary indices): the rows of the forward's
    argmax [2, n_slices, N] in this field order, like SliceStats."""

    orig: torch.Tensor
    sae: torch.Tensor


class SweepState(NamedTuple):
    """The running state of one program's sweep over its vocabulary slice, per token: the stats it
    writes, the centre c = m_sae - m_orig its sums are taken about (0 before the first tile), the
    argmaxes."""

    stats: SliceStats
    centre: torch.Tensor
    top: Top1


class Rescale(NamedTuple):
    """One tile's rescaling of the gradient's accumulators, per token: G0' = alpha G0,
    G1' = beta G1 + beta_minus_alpha G0 (as the sums U and S; _rescale_factors)."""

    alpha: torch.Tensor
    beta: torch.Tensor
    beta_minus_alpha: torch.Tensor


class TileTerms(NamedTuple):
    """What one tile's step of the sweep hands the gradient: the accumulators' rescaling, the
    tile's [BLOCK_N, BLOCK_V] weights e = exp(A - m_A) and e * expm1(x) (before cap'), and the
    filter's two numbers (module docstring): the largest bound on p and q, and how far the
    maxima moved (0 where every row kept its maxima)."""

    rescale: Rescale
    e: torch.Tensor
    e_em: torch.Tensor
    largest: torch.Tensor
    moved: torch.Tensor

# Cut Cross-Entropy's gradient filter: skip vocabulary tiles whose |q - p| is below this
# everywhere (error bound in the module docstring). 0 disables it.
FILTER_EPS = 2.0**-30
# Vocabulary tiles whose gradient products the two-pass gradient kernel sums before one write-back
# of its [BLOCK_N, d] gradient block (1 or 2; kernel_config uses 1 on sm_80).
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
def _phi_series(x):
    """phi(x) = expm1(x) - x = x^2/2! + ... + x^10/10!: fp32-exact for |x| <= 1/2 (the next
    term is below 1e-10 of the sum)."""
    return x * x * (1.0 / 2.0 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x * (
        1.0 / 5040.0 + x * (1.0 / 40320.0 + x * (1.0 / 362880.0 + x * (1.0 / 3628800.0)))))))))


@triton.jit
def _centered_terms(log_p, x):
    """(e, e * expm1(x), e * phi(x)) per entry, e = exp(log_p), log_p = A - m_A <= 0, x = D - c.

    |x| <= 1/2: the series (small differences keep their precision). Elsewhere e * expm1(x) is
    exp(log_p + x) - e, where log_p + x = B - m_B <= 0 cannot overflow (exp(x) alone could), and
    the subtractions lose at most a factor 2.5 (x > 1/2) or 20 (phi at |x| = 1/2) of fp32's
    precision. log_p = -inf (columns past the slice) gives three zeros."""
    e = tl.exp(log_p)
    small = tl.abs(x) <= 0.5
    xs = tl.where(small, x, 0.0)
    phi = _phi_series(xs)
    e_em = tl.where(small, e * (xs + phi), tl.exp(log_p + x) - e)
    return e, e_em, tl.where(small, e * phi, e_em - e * x)


@triton.jit
def _rescale_factors(log_alpha, k):
    """(a, b, b - a, a phi(k)) for a = exp(log_alpha) and b = a exp(k): the exact rescaling of the
    scaled sums when the running maximum moves by log_alpha <= 0 and the centre by -k (series
    where |k| <= 1/2). log_alpha = -inf (the first tile) gives four zeros for finite k."""
    a = tl.exp(log_alpha)
    b = tl.exp(log_alpha + k)  # exp(m_B - m_B') up to rounding: <= 1
    small = tl.abs(k) <= 0.5
    ks = tl.where(small, k, 0.0)
    phi = _phi_series(ks)
    b_minus_a = tl.where(small, a * (ks + phi), b - a)
    return a, b, b_minus_a, tl.where(small, a * phi, b_minus_a - a * k)


@triton.jit
def _dlogit_tile(h_ptr, dh_ptr, w_ptr, b_ptr, lse, dlse, rows, row_ok, cols, col_ok, w_ok, d_model, softcap,
                 stride_hn, stride_hd, stride_wd, stride_wv,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr):
    """d KL / d (uncapped SAE logits) on one tile, from the final lse's: (q - p) * cap'(b), fp32;
    0 past the slice.

    q - p = p * (exp(D - dlse) - 1), with a Taylor series for expm1 where |D - dlse| < 1/4 (a
    small difference keeps its precision); elsewhere exp(la + x) - p (p may underflow there
    while q does not)."""
    a, d, slope = _logit_tiles(h_ptr, dh_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, w_ok, d_model, softcap,
                               stride_hn, stride_hd, stride_wd, stride_wv,
                               HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
                               BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, MATMUL_MODE=MATMUL_MODE)
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
def _sweep_tile(state, a, d, cols, col_ok, label, v0, HAS_LABELS: tl.constexpr):
    """One vocabulary tile [v0, v0 + BLOCK_V) of the sweep, from its logit tiles A and D
    (_logit_tiles): the SweepState moved past it (maxima and argmaxes, label logits, centre, the
    scaled sums rescaled to the new maxima and centre plus the tile's terms), and the TileTerms
    the gradient's accumulators take from it."""
    stats = state.stats
    b = a + d  # the SAE run's logits: for the max, the argmax and the label only

    # Running argmax: strict > keeps the first index on ties, like torch.argmax.
    tile_max_orig = tl.max(a, axis=1)
    tile_max_sae = tl.max(b, axis=1)
    tile_top_orig = tl.argmax(a, axis=1, tie_break_left=True).to(tl.int32) + v0
    tile_top_sae = tl.argmax(b, axis=1, tie_break_left=True).to(tl.int32) + v0
    top = Top1(orig=tl.where(tile_max_orig > stats.m_orig, tile_top_orig, state.top.orig),
               sae=tl.where(tile_max_sae > stats.m_sae, tile_top_sae, state.top.sae))
    label_orig = stats.label_orig
    label_sae = stats.label_sae
    if HAS_LABELS:
        is_label = (cols[None, :] == label[:, None]) & col_ok[None, :]
        label_orig += tl.sum(tl.where(is_label, a, 0.0), axis=1)
        label_sae += tl.sum(tl.where(is_label, b, 0.0), axis=1)

    # New maxima and centre c = m_B - m_A; the first tile has m = -inf: a = b = 0 below (and a
    # finite k, from the centre's initial 0).
    m_orig = tl.maximum(stats.m_orig, tile_max_orig)
    m_sae = tl.maximum(stats.m_sae, tile_max_sae)
    centre = m_sae - m_orig
    k = state.centre - centre
    alpha, beta, beta_minus_alpha, alpha_phi = _rescale_factors(stats.m_orig - m_orig, k)
    x = d - centre[:, None]
    e, e_em, e_phi = _centered_terms(a - m_orig[:, None], x)
    # The scaled sums: every right-hand side reads the sums before this tile.
    s_sum, u_sum = stats.s_sum, stats.u_sum
    r_sum = alpha * stats.r_sum + beta_minus_alpha * u_sum + alpha_phi * s_sum + tl.sum(e_phi, axis=1)
    u_sum = beta * u_sum + beta_minus_alpha * s_sum + tl.sum(e_em, axis=1)
    t_sum = alpha * (stats.t_sum + k * s_sum) + tl.sum(e * x, axis=1)
    s_sum = alpha * s_sum + tl.sum(e, axis=1)
    stats = SliceStats(m_orig=m_orig, m_sae=m_sae, s_sum=s_sum, u_sum=u_sum, r_sum=r_sum, t_sum=t_sum,
                       label_orig=label_orig, label_sae=label_sae)

    # The filter (module docstring): e >= p and e + |e_em| >= exp(B - m_B) >= q at the end of the
    # sweep; moved is 0 where every row kept its maxima (a = 1, k = 0). NaN never compares below.
    largest = tl.max(tl.max(e + tl.abs(e_em), axis=1), axis=0)
    moved = tl.max(tl.abs(k) + (1.0 - alpha), axis=0)
    terms = TileTerms(rescale=Rescale(alpha=alpha, beta=beta, beta_minus_alpha=beta_minus_alpha), e=e, e_em=e_em,
                      largest=largest, moved=moved)
    return SweepState(stats=stats, centre=centre, top=top), terms


@triton.jit
def _accumulate_step(g0, g1, op0, op1, rescale, w_ptr, cols, w_ok, k0, d_model, stride_wd, stride_wv,
                     BLOCK_D: tl.constexpr, MATMUL_MODE: tl.constexpr):
    """One d chunk of one tile's update of the transposed accumulators ([BLOCK_D, BLOCK_N] chunks
    of G^T): G1 <- b G1 + (b - a) G0 + W op1, G0 <- a G0 + W op0 (rescale: a, b, b - a), with W
    the tile's [BLOCK_D, BLOCK_V] slice of W_U and op the [BLOCK_V, BLOCK_N] operands. Transposed,
    the operands are the MMA's B side, which the tensor cores read from shared memory (on sm_90):
    held as the A side they would take BLOCK_V / 2 registers per thread each. Addresses are formed
    per step: a pointer tile carried through the loop would hold two registers per element."""
    ks = k0 + tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * stride_wd + cols.to(tl.int64)[None, :] * stride_wv,
                mask=(ks < d_model)[:, None] & w_ok[None, :], other=0.0)
    g1 = mma(w, op1, rescale.beta[None, :] * g1 + rescale.beta_minus_alpha[None, :] * g0, MATMUL_MODE)
    g0 = mma(w, op0, rescale.alpha[None, :] * g0, MATMUL_MODE)
    return g0, g1


@triton.jit
def _linear_kl_forward_kernel(
    h_ptr, dh_ptr, w_ptr, b_ptr, mask_ptr, labels_ptr, stats_ptr, argmax_ptr, acc_ptr,
    n_tokens, d_model, d_vocab, w_cols, tiles_per_slice, softcap, filter_eps,
    stride_hn, stride_hd, stride_wd, stride_wv,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP: tl.constexpr,
    WITH_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DG: tl.constexpr, MATMUL_MODE: tl.constexpr,
):
    """Per (row block, vocabulary slice): the SweepState (running maxima and argmaxes of A and B,
    the scaled sums S, U, R, T, the label's logits); WITH_GRAD: the accumulators G0, G1 of the
    slice, updated in place in acc[:, slice, :, rows] (transposed) after every vocabulary tile, in
    BLOCK_DG-wide d chunks. Writes stats[:, slice, rows] (SliceStats' rows) and argmax[:, slice,
    rows] (Top1's); nothing for a block whose tokens are all masked. b_ptr, mask_ptr, labels_ptr
    and acc_ptr are None without HAS_BIAS, HAS_MASK, HAS_LABELS and WITH_GRAD."""
    row_block = tl.program_id(0)
    vocab_slice = tl.program_id(1)
    n_slices = tl.num_programs(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < n_tokens
    row_ok = in_range
    if HAS_MASK:  # masked tokens are never read (a NaN hidden state there stays out)
        row_ok = row_ok & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
        if tl.max(row_ok.to(tl.int32), axis=0) == 0:
            return  # the epilogue ignores masked tokens: nothing to write
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1) if HAS_LABELS else rows

    no_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    state = SweepState(
        stats=SliceStats(m_orig=no_max, m_sae=no_max, s_sum=zero, u_sum=zero, r_sum=zero, t_sum=zero,
                         label_orig=zero, label_sae=zero),
        centre=zero, top=Top1(orig=tl.zeros((BLOCK_N,), dtype=tl.int32), sae=tl.zeros((BLOCK_N,), dtype=tl.int32)))

    v_begin = vocab_slice * tiles_per_slice * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_slice * BLOCK_V, d_vocab)
    w_end = tl.minimum(v_begin + tiles_per_slice * BLOCK_V, w_cols)  # W_U's zero padding may load
    # acc = [G0^T, G1^T], [2, n_slices, d, N] contiguous: G1 sits g1_offset elements after G0
    # (int64: 2 * n_slices * d * N may pass 2^31).
    g_first = vocab_slice.to(tl.int64) * d_model
    g1_offset = n_slices.to(tl.int64) * d_model * n_tokens
    ks = tl.arange(0, BLOCK_DG)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        w_ok = cols < w_end
        # The tile's two logit products (and cap' at B), then the online log-sum-exp and KL sums.
        a, d, slope = _logit_tiles(h_ptr, dh_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, w_ok, d_model, softcap,
                                   stride_hn, stride_hd, stride_wd, stride_wv, HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP,
                                   BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, MATMUL_MODE=MATMUL_MODE)
        state, terms = _sweep_tile(state, a, d, cols, col_ok, label, v0, HAS_LABELS=HAS_LABELS)
        if WITH_GRAD:
            e = terms.e
            e_em = terms.e_em
            if SOFTCAP:
                e = e * slope
                e_em = e_em * slope
            # Tensor-core operands in W_U's dtype (both bounded by 1 in magnitude), transposed for
            # _accumulate_step.
            op0 = tl.trans(e.to(w_ptr.dtype.element_ty))
            op1 = tl.trans(e_em.to(w_ptr.dtype.element_ty))
            # The filter skips a tile only if it may (module docstring); NaN is never skipped.
            if not ((terms.largest < filter_eps) & (terms.moved == 0.0)):
                keep = v0 != v_begin  # on the slice's first tile the buffers hold nothing yet
                for k0 in range(0, d_model, BLOCK_DG):
                    g_mask = ((k0 + ks) < d_model)[:, None] & in_range[None, :]
                    g_ptrs = acc_ptr + (g_first + k0 + ks)[:, None] * n_tokens + rows[None, :]
                    # where, not a zero factor: the first tile's reads are uninitialised memory
                    g0 = tl.where(keep, tl.load(g_ptrs, mask=g_mask, other=0.0), 0.0)
                    g1 = tl.where(keep, tl.load(g_ptrs + g1_offset, mask=g_mask, other=0.0), 0.0)
                    g0, g1 = _accumulate_step(g0, g1, op0, op1, terms.rescale, w_ptr, cols, w_ok, k0, d_model,
                                              stride_wd, stride_wv, BLOCK_D=BLOCK_DG, MATMUL_MODE=MATMUL_MODE)
                    tl.store(g_ptrs, g0, mask=g_mask)
                    tl.store(g_ptrs + g1_offset, g1, mask=g_mask)

    # int64: N_STATS * n_slices * N passes 2^31 where a caller-chosen n_slices meets a large N.
    stride_stat = n_slices.to(tl.int64) * n_tokens
    out = stats_ptr + vocab_slice.to(tl.int64) * n_tokens + rows
    for row in tl.static_range(len(state.stats)):  # SliceStats' field order is the rows' order
        tl.store(out + row * stride_stat, state.stats[row], mask=in_range)
    top = argmax_ptr + vocab_slice.to(tl.int64) * n_tokens + rows
    for row in tl.static_range(len(state.top)):
        tl.store(top + row * stride_stat, state.top[row], mask=in_range)


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
                           HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
                           BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, MATMUL_MODE=MATMUL_MODE)
        largest = tl.max(tl.max(tl.abs(dl0), axis=1), axis=0)
        if V_GROUP == 2:
            cols1 = cols0 + BLOCK_V
            ok1 = cols1 < v_end
            w_ok1 = cols1 < w_end
            dl1 = _dlogit_tile(h_ptr, dh_ptr, w_ptr, b_ptr, lse, dlse, rows, row_ok, cols1, ok1, w_ok1, d_model,
                               softcap, stride_hn, stride_hd, stride_wd, stride_wv,
                               HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP, BLOCK_N=BLOCK_N,
                               BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, MATMUL_MODE=MATMUL_MODE)
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

KERNEL_KINDS = ("forward", "sweep", "grad")


def kernel_config(dtype: torch.dtype, device: torch.device, *, kind: str = "forward",
                  softcap: bool = False) -> dict:
    """Block sizes and launch options of one kernel kind for one dtype on one device: "forward"
    (loss and stats), "sweep" (loss and gradient in one sweep: adds BLOCK_DG, the d chunk of the
    accumulators' update), "grad" (the two-pass gradient of reduction="none": adds V_GROUP, the
    vocabulary tiles per write-back).

    The arch is the device's (kernels._common.gpu_arch).
    softcap: capped logits (more live tiles in the sweep).
    sm_90 and later (wgmma, accumulators in registers, operands in shared memory), 8 warps, three
    stages, BLOCK_D 64 for 16-bit inputs and 32 for fp32:
    - forward and sweep: 64 x 64 tiles (64 x 32 for the capped sweep); the sweep updates its
      transposed accumulators in 64-wide d chunks (BLOCK_DG = 64: wgmma needs M >= 64; smaller
      chunks fall back to mma.sync), once per tile. Wider tiles spill (64 x 128, the forward's
      tile before the stable KL added its sums; for the sweep also 2 x 64 x 64 with the
      rescaling factors chained);
    - grad: 64 x 128 tiles, two tiles per write-back (capped: 64 x 64, one).
    sm_80 (mma.sync holds its operands in registers too): 64 x 64 tiles for the forward, 32 x 64
    (BLOCK_D 32) for both gradient kernels, one tile per write-back; the sweep's accumulators in
    16-wide d chunks.
    The MATMUL_MODE is matmul_mode(dtype). "ieee" (exact fp32 by request) runs on
    CUDA-core FMAs, whose operands live in registers, 4 warps: the forward 16 x 32 with BLOCK_D 16,
    the sweep the same with 16-wide accumulator chunks, the two-pass gradient 32 x 64 (sm_90;
    capped: 32 x 32) with BLOCK_D 32 or 16 x 32 with BLOCK_D 16 (sm_80).
    Compile facts: tests/compile_check.py. Interpreter (CPU): bigger tiles mean fewer numpy steps.
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    grad = kind != "forward"
    arch = gpu_arch(device)
    if arch is None:
        config = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)
        v_group = GRAD_V_GROUP
    else:
        block_d = 32 if dtype == torch.float32 else 64
        v_group = 1
        if matmul_mode(dtype) == "ieee":
            if kind == "grad":
                # sm_80: BLOCK_D 32 spilled 8 B for a masked column-major W_U; sm_90: capped logits
                # hold more live tiles, and BLOCK_V 64 spilled 8-16 B
                block_n, block_v, block_d = (32, 32 if softcap else 64, 32) if arch >= 90 else (16, 32, 16)
            else:  # the forward spilled 8-16 B on sm_80 for a column-major W_U at BLOCK_V 64; the
                # sweep holds two more [BLOCK_N, BLOCK_V] operands in registers
                block_n, block_v, block_d = 16, 32, 16
            config = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=4, num_stages=3)
            if kind == "sweep":
                config["BLOCK_DG"] = 16
        elif arch >= 90:
            # capped logits hold more live tiles: narrower tiles, one per write-back
            block_v = (64 if softcap else 128) if kind == "grad" else 32 if softcap and kind == "sweep" else 64
            config = dict(BLOCK_N=64, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=8, num_stages=3)
            if kind == "sweep":
                config["BLOCK_DG"] = 64
            v_group = 1 if softcap else GRAD_V_GROUP
        elif grad:
            config = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)
            if kind == "sweep":
                config["BLOCK_DG"] = 16  # mma.sync's operands sit in registers: 32 spills
        else:
            config = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=block_d, num_warps=8, num_stages=3)
    if kind == "grad":
        config["V_GROUP"] = v_group
    return config


def _vocab_slices(n_row_blocks: int, n_vocab_tiles: int, device: torch.device,
                  n_slices: int | None, *, waves: int = 2) -> tuple[int, int]:
    """(tiles per slice, slices): enough programs for `waves` waves over the GPU's SMs.

    The one-sweep kernel asks for one wave (waves=1): each slice costs it 2 x N x d fp32 of
    accumulators and a share of the merge, and from one row block per SM on it needs no slicing."""
    if n_slices is None:
        n_slices = _slices_for_sms(n_row_blocks, sm_count(device), waves) if gpu_arch(device) is not None else 1
    n_slices = max(1, min(n_slices, n_vocab_tiles))
    tiles_per_slice = -(-n_vocab_tiles // n_slices)
    return tiles_per_slice, -(-n_vocab_tiles // tiles_per_slice)  # no empty slice


def _slices_for_sms(n_row_blocks: int, sm_count: int, waves: int) -> int:
    return -(-waves * sm_count // max(1, n_row_blocks))  # N = 0 has no row blocks


# The padded copies padded_unembedding made and still alive, by id (their padding is zero).
_PADDED_UNEMBEDDINGS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def padded_unembedding(W_U: torch.Tensor) -> torch.Tensor:
    """W_U itself, or, for a row-major W_U whose row stride is not a multiple of 16 elements, an
    equal [d, V] view of a buffer with rows zero-padded to a multiple of 16 (vectorised, pipelined
    tile loads; see loadable_columns).

    A fresh copy every call: nothing about a tensor tells reliably that its values are the ones a
    cached copy was made from (a write through W_U.data, or through another tensor sharing its
    storage, leaves the version counter alone), and a stale copy would be silently wrong. The copy
    reads and writes d * V elements once (about 0.15 GB in fp32 at GPT-2's W_U: tens of
    microseconds on an H100, under 1 % of the one-sweep kernel, which streams W_U from every row
    block); its buffer lives as long as the call's autograd graph needs it.
    """
    if W_U.dim() != 2 or W_U.stride(1) != 1 or W_U.stride(0) % 16 == 0 or W_U.shape[0] <= 1:
        return W_U
    d_model, d_vocab = W_U.shape
    # Zero padding: the kernels may load it (vectorised loads up to the 16-aligned width), and a
    # zero W_U column adds nothing to any product.
    padded = W_U.new_zeros(d_model, -(-d_vocab // 16) * 16)[:, :d_vocab]
    padded.copy_(W_U)
    _PADDED_UNEMBEDDINGS[id(padded)] = padded
    return padded


def loadable_columns(W_U: torch.Tensor) -> int:
    """How many columns of W_U the kernels may load: the 16-aligned width of a buffer made by
    padded_unembedding (its padding is zero), else W_U's own d_vocab."""
    if _PADDED_UNEMBEDDINGS.get(id(W_U)) is W_U:
        return W_U.stride(0)
    return W_U.shape[1]


class LinearKLForward(NamedTuple):
    """The forward's per-token results, fp32 [N]: kl; lse_orig and dlse = lse_sae - lse_orig (for
    the two-pass gradient); agree (top-1 agreement, bool); ce_orig / ce_sae (lse - the label's
    logit; meaningless where the token has no label); grad [N, d] = token_weight * dKL/dh_sae
    (the one-sweep kernel), else None."""

    kl: torch.Tensor
    lse_orig: torch.Tensor
    dlse: torch.Tensor
    agree: torch.Tensor
    ce_orig: torch.Tensor
    ce_sae: torch.Tensor
    grad: torch.Tensor | None


def linear_kl_forward(h_orig, delta, W_U, b_U, mask, labels, softcap=None, *, token_weight=None,
                      filter_eps=FILTER_EPS, config=None, n_slices=None, w_cols=None) -> LinearKLForward | None:
    """Run the forward kernel and merge its vocabulary slices; with token_weight [N] (fp32), the
    one-sweep kernel, which also returns the gradient.

    h_orig and delta = h_sae - h_orig share one layout; W_U [d, V] (any strides); b_U fp32 [V]
    (prepared_bias) or None; mask int8 [N] or None; labels int64 [N] or None. w_cols: the columns
    the kernel may load (loadable_columns(W_U) when None).
    """
    n_tokens, d_model = h_orig.shape
    d_vocab = W_U.shape[1]
    with_grad = token_weight is not None
    config = dict(config or kernel_config(h_orig.dtype, h_orig.device, kind="sweep" if with_grad else "forward",
                                          softcap=softcap is not None))
    config.pop("V_GROUP", None)  # a config made for the two-pass gradient (tests) may carry it
    config.setdefault("BLOCK_DG", config["BLOCK_D"])
    n_row_blocks = triton.cdiv(n_tokens, config["BLOCK_N"])
    tiles_per_slice, slices = _vocab_slices(n_row_blocks, triton.cdiv(d_vocab, config["BLOCK_V"]), h_orig.device,
                                            n_slices, waves=1 if with_grad else 2)
    device = h_orig.device
    stats = torch.empty(N_STATS, slices, n_tokens, dtype=torch.float32, device=device)
    top = torch.empty(len(Top1._fields), slices, n_tokens, dtype=torch.int32, device=device)
    # The accumulators of the gradient (module docstring).
    acc = torch.empty(2, slices, d_model, n_tokens, dtype=torch.float32, device=device) if with_grad else None
    # Optional inputs left out are None (constants in the compiled kernel), behind the flags in meta.
    args = dict(h_ptr=h_orig, dh_ptr=delta, w_ptr=W_U, b_ptr=b_U, mask_ptr=mask, labels_ptr=labels,
                stats_ptr=stats, argmax_ptr=top, acc_ptr=acc,
                n_tokens=n_tokens, d_model=d_model, d_vocab=d_vocab,
                w_cols=loadable_columns(W_U) if w_cols is None else w_cols, tiles_per_slice=tiles_per_slice,
                softcap=float(softcap or 1.0), filter_eps=float(filter_eps),
                stride_hn=h_orig.stride(0), stride_hd=h_orig.stride(1), stride_wd=W_U.stride(0),
                stride_wv=W_U.stride(1))
    meta = dict(HAS_BIAS=b_U is not None, HAS_MASK=mask is not None, HAS_LABELS=labels is not None,
                SOFTCAP=softcap is not None, WITH_GRAD=with_grad, MATMUL_MODE=matmul_mode(h_orig.dtype), **config)
    _linear_kl_forward_kernel[(n_row_blocks, slices)](**args, **meta)
    return _merge_slices(SliceStats(*stats), Top1(*top), acc, token_weight)


def _merge_slices(stats: SliceStats, top: Top1, acc, token_weight) -> LinearKLForward:
    """Merge the vocabulary slices (the kernel's stats and argmaxes, [n_slices, N] per field):
    each slice's scaled sums and accumulators move to the global maximum and centre with the same
    exact rescaling as inside a slice (flash-decoding style). Tokens of a block that was all masked
    have no stats (the kernel returned at once): their entries here are garbage, and the caller
    masks them out (token_weight is 0 there)."""
    max_orig, best_orig = stats.m_orig.max(0)  # first slice wins ties: the lower vocabulary index
    max_sae, best_sae = stats.m_sae.max(0)
    centre = max_sae - max_orig
    k = (stats.m_sae - stats.m_orig) - centre  # exactly 0 for one slice
    alpha, beta, beta_minus_alpha, alpha_phi = rescale_factors(stats.m_orig - max_orig, k)
    s_sum, u_sum = stats.s_sum, stats.u_sum
    total_s = (alpha * s_sum).sum(0)
    total_u = (beta * u_sum + beta_minus_alpha * s_sum).sum(0)
    total_r = (alpha * stats.r_sum + beta_minus_alpha * u_sum + alpha_phi * s_sum).sum(0)
    total_t = (alpha * (stats.t_sum + k * s_sum)).sum(0)
    kl, log1p_u = kl_from_sums(total_s, total_u, total_r, total_t)
    lse_orig = max_orig + torch.log(total_s)
    dlse = centre + log1p_u
    agree = top.orig.gather(0, best_orig[None]).squeeze(0) == top.sae.gather(0, best_sae[None]).squeeze(0)
    ce_orig = lse_orig - stats.label_orig.sum(0)  # only the slice holding the label adds a nonzero logit
    ce_sae = (lse_orig + dlse) - stats.label_sae.sum(0)
    grad = None
    if acc is not None:
        g0, g1 = acc.unbind(0)
        # grad = token_weight / (S (1 + u)) * (G1 - u G0), G0 = sum_s a_s G0_s, G1 = sum_s (b_s G1_s + (b_s - a_s) G0_s)
        u = total_u / total_s
        scale = token_weight / (total_s + total_u)
        coef0 = scale * (beta_minus_alpha - u * alpha)  # [slices, N]
        coef1 = scale * beta
        if g0.shape[0] == 1:  # in place: no third [N, d] buffer (a transposed view of G1's)
            grad = g1[0].mul_(coef1[0, None, :]).addcmul_(g0[0], coef0[0, None, :]).t()
        else:
            grad = torch.einsum("sn,sdn->nd", coef1, g1).add_(torch.einsum("sn,sdn->nd", coef0, g0))
        # torch.where, not a product: a masked token's accumulators may be garbage (never written).
        grad = torch.where((token_weight != 0)[:, None], grad, 0.0)
    return LinearKLForward(kl, lse_orig, dlse, agree, ce_orig, ce_sae, grad)


def linear_kl_grad(h_orig, delta, W_U, b_U, mask, lse_orig, dlse, token_weight, softcap=None, *,
                   filter_eps=FILTER_EPS, config=None, n_slices=None, w_cols=None):
    """The two-pass gradient (reduction="none"): grad_h_sae [N, d] fp32 =
    token_weight[:, None] * ((q - p) * cap') @ W_U^T, from the forward's lse_orig and dlse."""
    n_tokens, d_model = h_orig.shape
    d_vocab = W_U.shape[1]
    config = dict(config or kernel_config(h_orig.dtype, h_orig.device, kind="grad", softcap=softcap is not None))
    v_group = config.pop("V_GROUP", GRAD_V_GROUP)
    n_row_blocks = triton.cdiv(n_tokens, config["BLOCK_N"])
    groups_per_slice, slices = _vocab_slices(
        n_row_blocks, triton.cdiv(d_vocab, v_group * config["BLOCK_V"]), h_orig.device, n_slices)
    grad = torch.zeros(n_tokens, d_model, dtype=torch.float32, device=h_orig.device)
    args = dict(h_ptr=h_orig, dh_ptr=delta, w_ptr=W_U, b_ptr=b_U, mask_ptr=mask, lse_ptr=lse_orig.contiguous(),
                dlse_ptr=dlse.contiguous(), weight_ptr=token_weight.float().contiguous(), grad_ptr=grad,
                n_tokens=n_tokens, d_model=d_model, d_vocab=d_vocab,
                w_cols=loadable_columns(W_U) if w_cols is None else w_cols, groups_per_slice=groups_per_slice,
                softcap=float(softcap or 1.0), filter_eps=float(filter_eps),
                stride_hn=h_orig.stride(0), stride_hd=h_orig.stride(1), stride_wd=W_U.stride(0),
                stride_wv=W_U.stride(1), stride_gn=grad.stride(0))
    meta = dict(HAS_BIAS=b_U is not None, HAS_MASK=mask is not None, SOFTCAP=softcap is not None,
                USE_ATOMICS=slices > 1, V_GROUP=v_group, MATMUL_MODE=matmul_mode(h_orig.dtype), **config)
    _linear_kl_grad_kernel[(n_row_blocks, slices)](**args, **meta)
    return grad


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class LinearKLFunction(torch.autograd.Function):
    """(loss, sums) with the reference's contract; differentiable in h_sae only.

    Scalar reductions that need a gradient run the one-sweep kernel (the gradient is computed in
    the forward; backward scales it by grad_output); reduction="none" runs the forward kernel, then
    the two-pass gradient kernel in backward with the per-token grad_output. one_sweep=False runs
    scalar reductions the two-pass way too (the dispatch takes it where it was measured faster)."""

    @staticmethod
    def forward(ctx, h_sae, h_orig, W_U, b_U, mask, labels, reduction, ignore_index, softcap, filter_eps, config,
                n_slices, one_sweep):
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
        one_sweep = one_sweep and reduction != "none" and ctx.needs_input_grad[0]

        out = linear_kl_forward(h_orig, delta, W_U, b_U, mask8, labels, softcap,
                                token_weight=token_weight if one_sweep else None, filter_eps=filter_eps,
                                config=config, n_slices=n_slices)
        kl = torch.where(counted, out.kl, 0.0)

        ce_orig = ce_sae = n_labelled = torch.zeros((), dtype=torch.float32, device=h_sae.device)
        if labels is not None:
            has_label = counted & (labels != ignore_index)
            ce_orig = torch.where(has_label, out.ce_orig, 0.0).sum()
            ce_sae = torch.where(has_label, out.ce_sae, 0.0).sum()
            n_labelled = has_label.sum()
        sums = KLSums(ce_orig=ce_orig, ce_sae=ce_sae, n_labelled=n_labelled, n_agree=(out.agree & counted).sum(),
                      n_counted=n_counted).stacked()

        ctx.reduction, ctx.h_dtype, ctx.softcap = reduction, h_sae.dtype, softcap
        ctx.filter_eps, ctx.config, ctx.n_slices = filter_eps, config, n_slices
        ctx.one_sweep = one_sweep
        loss = kl if reduction == "none" else (kl * token_weight).sum() if reduction == "mean" else kl.sum()
        if one_sweep:
            ctx.save_for_backward(out.grad)
        elif ctx.needs_input_grad[0]:
            ctx.save_for_backward(h_orig, delta, W_U, b_U, mask8, out.lse_orig, out.dlse, token_weight)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        if not ctx.needs_input_grad[0]:
            return (None,) * 13
        if ctx.one_sweep:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_loss
        else:
            h_orig, delta, W_U, b_U, mask8, lse_orig, dlse, token_weight = ctx.saved_tensors
            # "none": one grad_output per token; a scalar one broadcasts
            grad = linear_kl_grad(h_orig, delta, W_U, b_U, mask8, lse_orig, dlse, token_weight * grad_loss.float(),
                                  ctx.softcap, filter_eps=ctx.filter_eps, config=ctx.config, n_slices=ctx.n_slices)
        return (grad.to(ctx.h_dtype),) + (None,) * 12


def linear_kl_triton(h_sae, h_orig, W_U, b_U=None, mask=None, labels=None, reduction="mean",
                     ignore_index=-100, softcap=None, one_sweep=True, *, filter_eps=FILTER_EPS, config=None,
                     n_slices=None):
    """Fused linear + KL on validated, flattened inputs: h_* [N, d], W_U [d, V], b_U [V] or None,
    mask [N] bool or None, labels [N] int64 or None, softcap a positive float or None (final-logit
    soft-capping). Returns (loss, sums) like the reference.

    one_sweep: scalar reductions compute the gradient in the forward's sweep (8*N*d*V); False runs
    the forward, then the two-pass gradient in backward (4 + 6*N*d*V), as reduction="none" does.
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
                                  filter_eps, config, n_slices, one_sweep)
