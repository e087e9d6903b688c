"""Fused unembedding + KL(p_orig || p_sae) over the vocabulary, without the [N, V] logits.

p_orig = softmax(h_orig @ W_U + b_U) (the frozen model), p_sae = softmax(h_sae @ W_U + b_U) (the
model with the SAE spliced in). The loss per token is

    KL = sum_v p_v (a_v - b_v) - lse(a) + lse(b),    a = logits of h_orig, b = logits of h_sae.

Forward (`_linear_kl_forward_kernel`): one program per (block of BLOCK_N tokens, slice of the
vocabulary). It walks its vocabulary slice in BLOCK_V tiles; each tile of logits for BOTH runs is
built in registers by a loop of tl.dot over d_model in BLOCK_D steps that loads the W_U tile once
for both runs. Per row it keeps an online log-sum-exp for a and for b (running max m, rescaled sum
s), the p-weighted sum t = sum exp(a - m_a) (a - b) (rescaled with s_a), the running argmax of a and
of b, and the label's logit. Each program writes these few numbers per row; a tiny torch epilogue
merges the vocabulary slices (flash-decoding style) into KL, lse and the stats. Slicing the
vocabulary gives the GPU enough programs when N is small (N = 2,048 is only 32 row blocks).

Gradient (`_linear_kl_grad_kernel`): d KL / d h_sae = (q - p) @ W_U^T times the token's weight.
It needs both final lse, so it is a second sweep: the same tiles of a and b are recomputed, the
(q - p) tile is formed in registers and multiplied by W_U^T tile by tile into grad_h (fp32; atomics
when several vocabulary slices add to the same rows). The [BLOCK_N, d_model] gradient does not fit
in registers for d_model >= 768, so it is accumulated in global memory, which stays in L2.

Cost (GUIDE section 5): forward 4*N*d*V FLOPs (two logits passes), gradient 6*N*d*V (two logits
passes again + the product with W_U^T). Both ways of getting the gradient cost 10*N*d*V without
storing logits: "in the forward" needs the final lse first, so it is the same second sweep run
earlier; the 6*N*d*V of Liger-Kernel needs a [chunk, V] logits buffer in HBM. By default the
gradient sweep runs in backward (a forward-only call, e.g. evaluation, then costs 4*N*d*V, and no
[N, d] fp32 gradient is held between forward and backward); ``grad_in_forward=True`` runs it in the
forward for scalar reductions, as the reference does, and backward only scales it.

Numerics: fp32 accumulation whatever the input dtype; vocabulary columns past V are -inf (they get
p = q = 0 and never the argmax); a - b is taken only on real columns. The two runs use the same
instruction sequence, so h_sae == h_orig gives bit-identical logits, t = 0, equal lse, and exactly
0 loss and 0 gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The forward kernel writes, per vocabulary slice and token, N_STATS fp32 numbers in this order:
# m_orig, s_orig, t_kl, m_sae, s_sae, label_orig, label_sae  ->  stats [N_STATS, n_slices, N].
N_STATS = 7


@triton.jit
def _logit_tiles(h_orig_ptr, h_sae_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, d_model,
                 stride_hn, stride_hd, stride_wd, stride_wv,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Logit tiles a = h_orig @ W_U[:, cols] + b_U, b = h_sae @ W_U[:, cols] + b_U, fp32.

    Columns past d_vocab are -inf. The same code path builds a and b, so equal hidden states
    give bit-identical tiles.
    """
    a = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    b = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, d_model, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < d_model
        h_offsets = rows64[:, None] * stride_hn + ks[None, :] * stride_hd
        h_mask = row_ok[:, None] & k_ok[None, :]
        h_orig = tl.load(h_orig_ptr + h_offsets, mask=h_mask, other=0.0)
        h_sae = tl.load(h_sae_ptr + h_offsets, mask=h_mask, other=0.0)
        # One W_U tile serves both runs: the main memory traffic is W_U, read once per sweep.
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * stride_wd + cols64[None, :] * stride_wv,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.dot(h_orig, w, a, input_precision=INPUT_PRECISION)
        b = tl.dot(h_sae, w, b, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        a += bias[None, :]
        b += bias[None, :]
    a = tl.where(col_ok[None, :], a, float("-inf"))
    b = tl.where(col_ok[None, :], b, float("-inf"))
    return a, b


@triton.jit
def _linear_kl_forward_kernel(
    h_sae_ptr, h_orig_ptr, w_ptr, b_ptr, labels_ptr, stats_ptr, argmax_ptr,
    n_tokens, d_model, d_vocab, tiles_per_slice,
    stride_hn, stride_hd, stride_wd, stride_wv,
    HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Per (row block, vocabulary slice): online lse of a and b, p-weighted sum of a - b, argmax
    of a and b, label logits. Writes stats[:, slice, rows] and argmax[:, slice, rows]."""
    row_block = tl.program_id(0)
    vocab_slice = tl.program_id(1)
    n_slices = tl.num_programs(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)

    m_orig = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_sae = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_orig = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_sae = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_kl = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_v exp(a_v - m_orig) * (a_v - b_v)
    top_orig = tl.zeros((BLOCK_N,), dtype=tl.int32)
    top_sae = tl.zeros((BLOCK_N,), dtype=tl.int32)
    label_orig = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_sae = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = vocab_slice * tiles_per_slice * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_slice * BLOCK_V, d_vocab)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < d_vocab
        a, b = _logit_tiles(h_orig_ptr, h_sae_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, d_model,
                            stride_hn, stride_hd, stride_wd, stride_wv,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)

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
        e_orig = tl.exp(a - new_m_orig[:, None])  # 0 on the -inf columns
        e_sae = tl.exp(b - new_m_sae[:, None])
        # a - b on real columns only (-inf - -inf would be nan)
        diff = tl.where(col_ok[None, :], a, 0.0) - tl.where(col_ok[None, :], b, 0.0)
        s_orig = s_orig * alpha_orig + tl.sum(e_orig, axis=1)
        s_sae = s_sae * alpha_sae + tl.sum(e_sae, axis=1)
        t_kl = t_kl * alpha_orig + tl.sum(e_orig * diff, axis=1)
        m_orig = new_m_orig
        m_sae = new_m_sae

        if HAS_LABELS:
            is_label = cols[None, :] == label[:, None]
            label_orig += tl.sum(tl.where(is_label, a, 0.0), axis=1)
            label_sae += tl.sum(tl.where(is_label, b, 0.0), axis=1)

    # int64: N_STATS * n_slices * N passes 2^31 where a caller-chosen n_slices meets a large N.
    stride_stat = n_slices.to(tl.int64) * n_tokens
    out = stats_ptr + vocab_slice.to(tl.int64) * n_tokens + rows
    tl.store(out + 0 * stride_stat, m_orig, mask=row_ok)
    tl.store(out + 1 * stride_stat, s_orig, mask=row_ok)
    tl.store(out + 2 * stride_stat, t_kl, mask=row_ok)
    tl.store(out + 3 * stride_stat, m_sae, mask=row_ok)
    tl.store(out + 4 * stride_stat, s_sae, mask=row_ok)
    tl.store(out + 5 * stride_stat, label_orig, mask=row_ok)
    tl.store(out + 6 * stride_stat, label_sae, mask=row_ok)
    top = argmax_ptr + vocab_slice.to(tl.int64) * n_tokens + rows
    tl.store(top, top_orig, mask=row_ok)
    tl.store(top + stride_stat, top_sae, mask=row_ok)


@triton.jit
def _linear_kl_grad_kernel(
    h_sae_ptr, h_orig_ptr, w_ptr, b_ptr, lse_orig_ptr, lse_sae_ptr, weight_ptr, grad_ptr,
    n_tokens, d_model, d_vocab, tiles_per_slice,
    stride_hn, stride_hd, stride_wd, stride_wv, stride_gn,
    HAS_BIAS: tl.constexpr, USE_ATOMICS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """grad[rows] += weight[rows] * (q - p)[rows, slice] @ W_U[:, slice]^T, fp32."""
    row_block = tl.program_id(0)
    vocab_slice = tl.program_id(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    # A block of tokens that are all masked (padding) or have zero grad_output adds nothing.
    if tl.max(tl.abs(weight), axis=0) == 0.0:
        return
    lse_orig = tl.load(lse_orig_ptr + rows, mask=row_ok, other=0.0)
    lse_sae = tl.load(lse_sae_ptr + rows, mask=row_ok, other=0.0)
    rows64 = rows.to(tl.int64)

    v_begin = vocab_slice * tiles_per_slice * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_slice * BLOCK_V, d_vocab)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < d_vocab
        a, b = _logit_tiles(h_orig_ptr, h_sae_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, d_model,
                            stride_hn, stride_hd, stride_wd, stride_wv,
                            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
        # d KL / d b_v = q_v - p_v; exp(-inf) = 0 on the columns past d_vocab.
        dlogits = tl.exp(b - lse_sae[:, None]) - tl.exp(a - lse_orig[:, None])
        # Tensor-core operand in W_U's dtype (|q - p| <= 1, so fp16 keeps it); the token weight
        # (1/N for a mean) is applied after the product, in fp32, where it cannot underflow.
        dlogits = dlogits.to(w_ptr.dtype.element_ty)
        cols64 = cols.to(tl.int64)
        for k0 in range(0, d_model, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < d_model
            # W_U[ks, cols] loaded as [BLOCK_V, BLOCK_D], i.e. the tile of W_U^T.
            w_t = tl.load(w_ptr + ks.to(tl.int64)[None, :] * stride_wd + cols64[:, None] * stride_wv,
                          mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            part = tl.dot(dlogits, w_t, input_precision=INPUT_PRECISION) * weight[:, None]
            g_ptrs = grad_ptr + rows64[:, None] * stride_gn + ks[None, :]
            g_mask = row_ok[:, None] & k_ok[None, :]
            if USE_ATOMICS:
                tl.atomic_add(g_ptrs, part, mask=g_mask)
            else:  # this program owns these rows: a plain read-modify-write is exact and ordered
                tl.store(g_ptrs, tl.load(g_ptrs, mask=g_mask, other=0.0) + part, mask=g_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def kernel_config(dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes and launch options for one dtype on one device.

    GPU: 64 x 128 logit tiles for both runs are 2 x 32 KiB of fp32 accumulators (8 warps: 64
    registers a thread); BLOCK_D 64 for 16-bit inputs, 32 for fp32 so that three pipeline stages
    of the h and W_U tiles fit sm_80's 163 KiB of shared memory. Compile-checked in
    tests/test_linear_kl.py. Interpreter (CPU): bigger tiles mean fewer numpy steps.
    """
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)
    block_d = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=block_d, num_warps=8, num_stages=3)


def _input_precision(dtype: torch.dtype, device: torch.device) -> str:
    # fp32 inputs: exact fp32 products unless the user allowed TF32 for matmuls, as torch does.
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


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


def linear_kl_forward(h_sae, h_orig, W_U, b_U, labels, *, config=None, n_slices=None):
    """Run the forward kernel and merge the vocabulary slices.

    Returns (kl [N], lse_orig [N], lse_sae [N], top1 agreement [N] bool, ce_orig [N], ce_sae [N])
    in fp32; ce_* are lse - label logit (meaningless where the token has no label).
    """
    n_tokens, d_model = h_sae.shape
    d_vocab = W_U.shape[1]
    config = dict(config or kernel_config(h_sae.dtype, h_sae.device))
    n_row_blocks = triton.cdiv(n_tokens, config["BLOCK_N"])
    tiles_per_slice, slices = _vocab_slices(
        n_row_blocks, triton.cdiv(d_vocab, config["BLOCK_V"]), h_sae.device, n_slices)
    stats = torch.empty(N_STATS, slices, n_tokens, dtype=torch.float32, device=h_sae.device)
    top = torch.empty(2, slices, n_tokens, dtype=torch.int32, device=h_sae.device)
    _linear_kl_forward_kernel[(n_row_blocks, slices)](
        h_sae, h_orig, W_U, b_U if b_U is not None else W_U, labels if labels is not None else top,
        stats, top,
        n_tokens, d_model, d_vocab, tiles_per_slice,
        h_sae.stride(0), h_sae.stride(1), W_U.stride(0), W_U.stride(1),
        HAS_BIAS=b_U is not None, HAS_LABELS=labels is not None,
        INPUT_PRECISION=_input_precision(h_sae.dtype, h_sae.device), **config)

    # Merge the slices: lse = M + log sum_s s_s exp(m_s - M); t rescales with the clean run's sums.
    m_orig, s_orig, t_kl, m_sae, s_sae, label_orig, label_sae = stats.unbind(0)
    max_orig, best_orig = m_orig.max(0)  # first slice wins ties: the lower vocabulary index
    max_sae, best_sae = m_sae.max(0)
    scale_orig = torch.exp(m_orig - max_orig)
    scale_sae = torch.exp(m_sae - max_sae)
    sum_orig = (s_orig * scale_orig).sum(0)
    sum_sae = (s_sae * scale_sae).sum(0)
    t_total = (t_kl * scale_orig).sum(0)
    lse_orig = max_orig + torch.log(sum_orig)
    lse_sae = max_sae + torch.log(sum_sae)
    # KL = E_p[a - b] - lse_a + lse_b, grouped so that the large terms cancel first.
    kl = t_total / sum_orig + (max_sae - max_orig) + (torch.log(sum_sae) - torch.log(sum_orig))
    agree = top[0].gather(0, best_orig[None]).squeeze(0) == top[1].gather(0, best_sae[None]).squeeze(0)
    ce_orig = lse_orig - label_orig.sum(0)  # only the slice holding the label adds a nonzero logit
    ce_sae = lse_sae - label_sae.sum(0)
    return kl, lse_orig, lse_sae, agree, ce_orig, ce_sae


def linear_kl_grad(h_sae, h_orig, W_U, b_U, lse_orig, lse_sae, token_weight, *, config=None,
                   n_slices=None):
    """grad_h_sae [N, d] fp32 = token_weight[:, None] * (q - p) @ W_U^T."""
    n_tokens, d_model = h_sae.shape
    d_vocab = W_U.shape[1]
    config = dict(config or kernel_config(h_sae.dtype, h_sae.device))
    n_row_blocks = triton.cdiv(n_tokens, config["BLOCK_N"])
    tiles_per_slice, slices = _vocab_slices(
        n_row_blocks, triton.cdiv(d_vocab, config["BLOCK_V"]), h_sae.device, n_slices)
    grad = torch.zeros(n_tokens, d_model, dtype=torch.float32, device=h_sae.device)
    _linear_kl_grad_kernel[(n_row_blocks, slices)](
        h_sae, h_orig, W_U, b_U if b_U is not None else W_U,
        lse_orig.contiguous(), lse_sae.contiguous(), token_weight.float().contiguous(), grad,
        n_tokens, d_model, d_vocab, tiles_per_slice,
        h_sae.stride(0), h_sae.stride(1), W_U.stride(0), W_U.stride(1), grad.stride(0),
        HAS_BIAS=b_U is not None, USE_ATOMICS=slices > 1,
        INPUT_PRECISION=_input_precision(h_sae.dtype, h_sae.device), **config)
    return grad


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class LinearKLFunction(torch.autograd.Function):
    """(loss, sums) with the reference's contract; differentiable in h_sae only."""

    @staticmethod
    def forward(ctx, h_sae, h_orig, W_U, b_U, mask, labels, reduction, ignore_index,
                grad_in_forward, config, n_slices):
        n_tokens = h_sae.shape[0]
        counted = torch.ones(n_tokens, dtype=torch.bool, device=h_sae.device) if mask is None else mask
        maskf = counted.float()
        n_counted = maskf.sum()
        token_weight = maskf / n_counted.clamp_min(1.0) if reduction == "mean" else maskf

        kl, lse_orig, lse_sae, agree, ce_orig, ce_sae = linear_kl_forward(
            h_sae, h_orig, W_U, b_U, labels, config=config, n_slices=n_slices)
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

        ctx.reduction, ctx.h_dtype, ctx.config, ctx.n_slices = reduction, h_sae.dtype, config, n_slices
        ctx.grad_in_forward = False
        if reduction == "none":
            loss = kl
        else:
            loss = (kl * token_weight).sum() if reduction == "mean" else kl.sum()
            if grad_in_forward and ctx.needs_input_grad[0]:
                ctx.grad_in_forward = True
                ctx.save_for_backward(linear_kl_grad(h_sae, h_orig, W_U, b_U, lse_orig, lse_sae, token_weight,
                                                     config=config, n_slices=n_slices))
        if not ctx.grad_in_forward:
            ctx.save_for_backward(h_sae, h_orig, W_U, b_U, lse_orig, lse_sae, token_weight)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        if ctx.grad_in_forward:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_loss
        else:
            h_sae, h_orig, W_U, b_U, lse_orig, lse_sae, token_weight = ctx.saved_tensors
            # scalar reductions: one grad_output for all tokens; "none": one per token.
            grad = linear_kl_grad(h_sae, h_orig, W_U, b_U, lse_orig, lse_sae, token_weight * grad_loss.float(),
                                  config=ctx.config, n_slices=ctx.n_slices)
        return (grad.to(ctx.h_dtype),) + (None,) * 10


def linear_kl_triton(h_sae, h_orig, W_U, b_U=None, mask=None, labels=None, reduction="mean",
                     ignore_index=-100, *, grad_in_forward=False, config=None, n_slices=None):
    """Fused linear + KL on validated, flattened inputs: h_* [N, d], W_U [d, V], b_U [V] or None,
    mask [N] bool or None, labels [N] int64 or None. Returns (loss, sums) like the reference.

    grad_in_forward: compute the gradient in the forward (scalar reductions only; same FLOPs).
    config / n_slices: override the block sizes and the number of vocabulary slices (tests).
    """
    if h_sae.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton linear-KL kernel takes float32/float16/bfloat16 inputs, got {h_sae.dtype}; "
                        "use backend='torch' for float64")
    if W_U.dtype != h_sae.dtype or (b_U is not None and b_U.dtype != h_sae.dtype):
        raise TypeError("h_sae, h_orig, W_U and b_U must share one dtype")
    h_orig = h_orig.detach()
    if h_orig.stride() != h_sae.stride():  # the kernels index both with one pair of strides
        h_sae, h_orig = h_sae.contiguous(), h_orig.contiguous()
    if labels is not None:
        labels = labels.long().contiguous()
    if mask is not None:
        mask = mask.bool()
    return LinearKLFunction.apply(h_sae, h_orig, W_U.detach(), None if b_U is None else b_U.detach(),
                                  mask, labels, reduction, ignore_index, grad_in_forward, config, n_slices)
