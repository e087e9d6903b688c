"""TopK encoder: values, indices = TopK(ReLU(x @ W_enc + b_enc)), fused, with its sparse backward.

Forward (`_topk_encode_fwd_kernel`). The grid is (row blocks, latent splits). A program owns
BLOCK_M tokens and one contiguous range of latents. It walks that range in tiles of BLOCK_N
latents; each tile of pre-activations is computed with tl.dot (fp32 accumulation) and gets the
bias, then only its entries above the row's current k-th best are candidates. A running top-k per
row (values + latent indices, unsorted, in registers) takes the candidates one round at a time:
each round inserts every row's largest candidate in place of that row's k-th best and drops the
candidates that fell below the raised k-th best. Rounds are data-dependent: k for the first tile,
then as many as the block's busiest row has new entries, which is few once a row has seen a few
thousand latents (for i.i.d. scores, tile t adds about k/t entries per row). This costs a handful
of cheap ops per element per round, where a bitonic merge of every tile (tl.topk) costs
~log2(BLOCK_N)*log2(k) compare-exchange levels of every element of every tile.

Only each program's k candidates are written to global memory ([N, splits, K_PAD], fp32 values +
int32 indices); a torch.topk over those splits * K_PAD candidates per token (tiny) gives the
answer, sorted largest first. The [N, n_latents] pre-activations never exist in global memory.
Selection compares the fp32 pre-activations exactly; ties go to the lower latent index within a
tile and to whichever torch.topk picks across splits. K_PAD = next_power_of_2(k) (Triton shapes
are powers of two); the padding slots hold +inf so they are never the row's minimum.

The ReLU is applied after selection: a token whose pre-activations are all negative still gets its
k largest pre-activations as indices, with values 0 (this is TopKEncodeReference's semantics).
Inputs must be finite (a NaN pre-activation is never selected; torch.topk would rank it first).

Backward (from the [N, k] gradient only, never an [N, k, d] or [N, n] tensor), with
grad_pre = grad_values * (values > 0):
- grad_x[t] = sum_j grad_pre[t, j] * W_enc[:, idx[t, j]]: `_gather_columns_kernel`.
- grad_W_enc, grad_b_enc: the (token, slot) pairs are sorted by latent (one torch.argsort of N*k
  ints), so each block of BLOCK_L consecutive latents owns one contiguous run of entries.
  `_latent_segment_grad_kernel` reduces that run with a tensor-core product
  x[tokens]^T @ onehot, where onehot[e, l] = grad_pre[e] if entry e belongs to latent l: no
  atomics, deterministic, fp32 accumulation, and every tile of grad_W_enc (including the all-zero
  ones of latents nobody picked) is written once, coalesced.

`sparse_encoder_backward` is shared with the ReLU encoder's sparse backward path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def encoder_preactivation_tile(
    x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, d_in,
    stride_xm, stride_xd, stride_wd, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """x[rows] @ W_enc[:, cols] + b_enc[cols]: one [BLOCK_M, BLOCK_N] fp32 tile of pre-activations.

    A tl.dot over d_in in steps of BLOCK_D, fp32 accumulation; masked rows / columns read 0.
    Shared by the TopK encoder's forward and kernels/relu_encoder.py's.

    Offsets are int64: N * stride_xm passes 2^31 at 524,288 tokens of d = 4,096, and d_in *
    n_latents at wide dictionaries (either operand may also be column-major, so both index
    vectors of each operand are widened). Only the 1-D index vectors are cast; the 2-D pointer
    tiles are 64-bit whatever the offset type.
    """
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d_start in range(0, d_in, BLOCK_D):
        ds = d_start + offs_d
        ds64 = ds.to(tl.int64)
        x_tile = tl.load(x_rows + ds64[None, :] * stride_xd,
                         mask=row_ok[:, None] & (ds[None, :] < d_in), other=0.0)
        w_tile = tl.load(w_cols + ds64[:, None] * stride_wd,
                         mask=(ds[:, None] < d_in) & col_ok[None, :], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _topk_encode_fwd_kernel(
    x_ptr, w_ptr, b_ptr, cand_val_ptr, cand_idx_ptr,
    n_tokens, d_in, n_latents, latents_per_split, k,
    stride_xm, stride_xd, stride_wd, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Row blocks vary fastest, so programs running side by side read the same W_enc slice (L2).
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    offs_n = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, K_PAD)
    split_start = split * latents_per_split
    split_end = tl.minimum(split_start + latents_per_split, n_latents)

    # Running top-k per row, unsorted. Slots >= k hold +inf so they are never the row's minimum,
    # never replaced, and the minimum over the buffer is exactly the k-th best so far.
    best_val = tl.where(slots[None, :] < k, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, K_PAD], tl.float32)
    best_idx = tl.zeros([BLOCK_M, K_PAD], tl.int32)
    kth_val, kth_slot = tl.min(best_val, axis=1, return_indices=True)

    for tile_start in range(split_start, split_end, BLOCK_N):
        cols = tile_start + offs_n
        col_ok = cols < split_end

        pre = encoder_preactivation_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, d_in,
                                         stride_xm, stride_xd, stride_wd, stride_wn,
                                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)

        # Candidates: entries above the row's current k-th best. After the first tiles they are
        # rare, so the selection loop below runs a few times per tile, not k times.
        cand = tl.where(col_ok[None, :] & (pre > kth_val[:, None]), pre, float("-inf"))
        top_val, top_pos = tl.max(cand, axis=1, return_indices=True)
        while tl.max(top_val, axis=0) > float("-inf"):
            # Insert each row's best candidate in place of the row's k-th best, where it is larger.
            take = top_val > kth_val
            replace = (slots[None, :] == kth_slot[:, None]) & take[:, None]
            best_val = tl.where(replace, top_val[:, None], best_val)
            best_idx = tl.where(replace, (tile_start + top_pos)[:, None], best_idx)
            kth_val, kth_slot = tl.min(best_val, axis=1, return_indices=True)
            # Drop the inserted entry and everything no longer above the raised k-th best: at most
            # k rounds per tile, since candidates leave in descending order.
            keep = (offs_n[None, :] != top_pos[:, None]) & (cand > kth_val[:, None])
            cand = tl.where(keep, cand, float("-inf"))
            top_val, top_pos = tl.max(cand, axis=1, return_indices=True)

    # Outputs: [n_tokens, n_splits, K_PAD]; the padding slots (>= k) are written as -inf. int64:
    # N * n_splits * K_PAD passes 2^31 for a caller-chosen `splits` at large N.
    out = (rows.to(tl.int64)[:, None] * n_splits + split) * K_PAD + slots[None, :]
    real = row_ok[:, None] & (slots[None, :] < k)
    tl.store(cand_val_ptr + out, tl.where(real, best_val, float("-inf")), mask=row_ok[:, None])
    tl.store(cand_idx_ptr + out, best_idx, mask=row_ok[:, None])


# Block sizes per K_PAD: (BLOCK_M, BLOCK_N, num_warps). The running buffer ([BLOCK_M, K_PAD] fp32
# values + int32 indices) lives in registers beside the [BLOCK_M, BLOCK_N] accumulator, so
# BLOCK_M shrinks as K_PAD grows. Each is compile-checked for sm_80/sm_90 in
# tests/test_topk_encoder.py.
FWD_CONFIGS = {
    32: (128, 128, 8),   # K_PAD <= 32
    64: (64, 128, 8),
    128: (64, 128, 8),
    256: (32, 128, 8),
}
FWD_NUM_STAGES = 3
MAX_FUSED_K = max(FWD_CONFIGS)
# Triton's interpreter (CPU tests) pays per tile, not per element: there, the smallest tile tl.dot
# accepts in rows. The kernel's logic is the same at every tile size.
INTERPRETER_FWD_BLOCK_M = 16


def fwd_config(k_pad: int, dtype: torch.dtype, device: torch.device) -> dict:
    block_m, block_n, num_warps = FWD_CONFIGS[max(32, k_pad)]
    if device.type != "cuda":
        block_m = INTERPRETER_FWD_BLOCK_M
    # fp32 tiles are twice the bytes: halve the reduction step to keep shared memory in budget.
    block_d = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
                num_stages=FWD_NUM_STAGES)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own matmul setting (TF32 off by default, so 'ieee')."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _default_splits(n_tokens: int, n_latents: int, block_m: int, block_n: int, device) -> int:
    """Enough latent splits to give every SM a few programs; never a split shorter than a tile."""
    if device.type == "cuda":
        target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another: fewer, longer ones are cheaper
        target_programs = 2
    row_blocks = max(1, triton.cdiv(n_tokens, block_m))  # N = 0: no row blocks, but no division by 0
    return max(1, min(triton.cdiv(target_programs, row_blocks), triton.cdiv(n_latents, block_n)))


def topk_encode_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                        splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward alone: (values [N, k] in x.dtype, indices [N, k] int64), largest first."""
    n_tokens, d_in = x.shape
    n_latents = W_enc.shape[1]
    k_pad = triton.next_power_of_2(k)
    if k_pad > MAX_FUSED_K:
        return _unfused_forward(x, W_enc, b_enc, k)
    if n_tokens == 0:  # an empty batch: nothing to launch (a 0-sized grid, a 0 in _default_splits)
        return (torch.empty(0, k, dtype=x.dtype, device=x.device),
                torch.empty(0, k, dtype=torch.int64, device=x.device))
    cfg = fwd_config(k_pad, x.dtype, x.device)
    block_n = cfg["BLOCK_N"]
    if splits is None:
        splits = _default_splits(n_tokens, n_latents, cfg["BLOCK_M"], block_n, x.device)
    # Split boundaries on tile multiples, so only the last tile of the last split is ragged.
    latents_per_split = triton.cdiv(triton.cdiv(n_latents, splits), block_n) * block_n
    splits = triton.cdiv(n_latents, latents_per_split)

    cand_val = torch.empty(n_tokens, splits * k_pad, dtype=torch.float32, device=x.device)
    cand_idx = torch.empty(n_tokens, splits * k_pad, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_M"]), splits)
    _topk_encode_fwd_kernel[grid](
        x, W_enc, b_enc, cand_val, cand_idx,
        n_tokens, d_in, n_latents, latents_per_split, k,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1),
        K_PAD=k_pad, DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    # Merge: the k largest of splits * K_PAD candidates per token (tiny), sorted largest first.
    pre, slot = cand_val.topk(k, dim=1)
    indices = cand_idx.gather(1, slot).long()
    return pre.clamp_min(0).to(x.dtype), indices


def _unfused_forward(x, W_enc, b_enc, k):
    """k > MAX_FUSED_K: addmm + torch.topk by token chunks (at most a [chunk, n] fp32 block)."""
    n_tokens, n_latents = x.shape[0], W_enc.shape[1]
    values = torch.empty(n_tokens, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n_tokens, k, dtype=torch.int64, device=x.device)
    step = max(1, (1 << 24) // n_latents)
    for start in range(0, n_tokens, step):
        pre = torch.addmm(b_enc.float(), x[start:start + step].float(), W_enc.float())
        top = pre.topk(k, dim=1)
        values[start:start + step] = top.values.clamp_min(0).to(x.dtype)
        indices[start:start + step] = top.indices
    return values, indices


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _gather_columns_kernel(
    grad_ptr, idx_ptr, w_ptr, out_ptr,
    n_tokens, d_in, k,
    stride_wd, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, :] = sum_j grad[t, j] * W[:, idx[t, j]]; grad, idx: [N, k] contiguous; fp32 sum."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_tokens
    d_ok = ds < d_in
    # int64 offsets: N * k (the ReLU path's k is its widest row) and N * d_in pass 2^31 at scale.
    rows64 = rows.to(tl.int64)
    code = rows64 * k
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, k):
        latent = tl.load(idx_ptr + code + j, mask=row_ok, other=0).to(tl.int64)
        weight = tl.load(grad_ptr + code + j, mask=row_ok, other=0.0).to(tl.float32)
        # Entries with zero gradient (ReLU-clamped, or padding of the ReLU path) need no load.
        live = row_ok & (weight != 0.0)
        column = tl.load(w_ptr + ds[None, :].to(tl.int64) * stride_wd + latent[:, None] * stride_wn,
                         mask=live[:, None] & d_ok[None, :], other=0.0)
        acc += weight[:, None] * column.to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * d_in + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _latent_segment_grad_kernel(
    x_ptr, tok_ptr, lat_ptr, grad_ptr, block_start_ptr, grad_w_ptr, grad_b_ptr,
    d_in, n_latents,
    stride_xm, stride_xd, stride_gwd, stride_gwn,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WRITE_BIAS: tl.constexpr,
):
    """grad_W[:, l] = sum over entries e of latent l of grad[e] * x[tok[e]]; grad_b[l] = sum grad[e].

    Entries are sorted by latent; block_start[i] is the first entry of latent block i.
    """
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    latent0 = pid_l * BLOCK_L
    offs_l = tl.arange(0, BLOCK_L)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ds64 = ds.to(tl.int64)
    d_ok = ds < d_in
    entry_start = tl.load(block_start_ptr + pid_l)
    entry_end = tl.load(block_start_ptr + pid_l + 1)

    acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for e_start in range(entry_start, entry_end, BLOCK_E):
        es = e_start + tl.arange(0, BLOCK_E)
        e_ok = es < entry_end
        token = tl.load(tok_ptr + es, mask=e_ok, other=0)
        latent = tl.load(lat_ptr + es, mask=e_ok, other=-1)
        weight = tl.load(grad_ptr + es, mask=e_ok, other=0.0)
        # x rows of these entries, transposed: [BLOCK_D, BLOCK_E]. int64 offsets: token * stride_xm
        # passes 2^31 at N * d >= 2^31 (and d * stride_xd for a column-major x).
        x_t = tl.load(x_ptr + token.to(tl.int64)[None, :] * stride_xm + ds64[:, None] * stride_xd,
                      mask=e_ok[None, :] & d_ok[:, None], other=0.0)
        # onehot[e, l] = weight[e] where entry e is latent0 + l: the segmented sum becomes a dot.
        # weight comes from a tensor of x's dtype, so the cast below is exact.
        hit = (latent - latent0)[:, None] == offs_l[None, :]
        onehot = tl.where(hit, weight[:, None], 0.0)
        acc = tl.dot(x_t, onehot.to(x_t.dtype), acc, input_precision=DOT_PRECISION)
        if WRITE_BIAS:
            bias_acc += tl.sum(onehot.to(tl.float32), axis=0)

    lats = latent0 + offs_l
    l_ok = lats < n_latents
    tl.store(grad_w_ptr + ds64[:, None] * stride_gwd + lats[None, :] * stride_gwn,
             acc.to(grad_w_ptr.dtype.element_ty), mask=d_ok[:, None] & l_ok[None, :])
    if WRITE_BIAS:
        if pid_d == 0:
            tl.store(grad_b_ptr + lats, bias_acc.to(grad_b_ptr.dtype.element_ty), mask=l_ok)


# (BLOCK_M, BLOCK_D, num_warps) of the gather; (BLOCK_L, BLOCK_D, BLOCK_E, num_warps) of the
# segmented reduction. Compile-checked in tests/test_topk_encoder.py.
GATHER_CONFIG = dict(BLOCK_M=32, BLOCK_D=128, num_warps=4)
SEGMENT_CONFIG = dict(BLOCK_L=64, BLOCK_D=128, BLOCK_E=32, num_warps=4)


def sparse_encoder_backward(grad_pre: torch.Tensor, indices: torch.Tensor, x: torch.Tensor,
                            W_enc: torch.Tensor, need_x: bool, need_w: bool, need_b: bool):
    """Gradients of an encoder whose code is (grad_pre [N, k], indices [N, k]) sparse.

    grad_pre is the gradient with respect to the selected pre-activations, already masked, in x's
    dtype. Returns (grad_x, grad_W_enc, grad_b_enc); None for those not needed.
    """
    n_tokens, k = indices.shape
    d_in, n_latents = W_enc.shape
    if n_tokens * k >= 2**31:
        raise ValueError(f"sparse_encoder_backward: N*k = {n_tokens * k} entries exceeds the int32 entry ids")
    if n_tokens * k == 0:  # an empty batch (or code): empty grad_x, zero grad_W_enc / grad_b_enc
        return (torch.zeros(n_tokens, d_in, dtype=x.dtype, device=x.device) if need_x else None,
                torch.zeros(d_in, n_latents, dtype=W_enc.dtype, device=x.device) if need_w else None,
                torch.zeros(n_latents, dtype=W_enc.dtype, device=x.device) if need_b else None)
    grad_pre = grad_pre.contiguous()
    indices = indices.contiguous()
    grad_x = grad_w = grad_b = None

    if need_x:
        grad_x = torch.empty(n_tokens, d_in, dtype=x.dtype, device=x.device)
        cfg = GATHER_CONFIG
        grid = (triton.cdiv(n_tokens, cfg["BLOCK_M"]), triton.cdiv(d_in, cfg["BLOCK_D"]))
        _gather_columns_kernel[grid](grad_pre, indices, W_enc, grad_x, n_tokens, d_in, k,
                                     W_enc.stride(0), W_enc.stride(1), **cfg)

    if need_w or need_b:
        # Sort the N*k (token, slot) entries by latent; then latent block i owns the entries
        # [block_start[i], block_start[i + 1]).
        flat = indices.reshape(-1)
        order = torch.argsort(flat)
        sorted_latents = flat[order].to(torch.int32)
        sorted_tokens = (order // k).to(torch.int32)
        sorted_grad = grad_pre.reshape(-1)[order]
        cfg = SEGMENT_CONFIG
        block_l = cfg["BLOCK_L"]
        n_blocks = triton.cdiv(n_latents, block_l)
        boundaries = torch.arange(0, (n_blocks + 1) * block_l, block_l, device=x.device, dtype=torch.int32)
        block_start = torch.searchsorted(sorted_latents, boundaries).to(torch.int32)
        # grad_W is written straight in W_enc's dtype from the fp32 accumulator.
        grad_w = torch.empty(d_in, n_latents, dtype=W_enc.dtype, device=x.device) if need_w else None
        grad_b = torch.empty(n_latents, dtype=W_enc.dtype, device=x.device) if need_b else None
        # Without a weight gradient, one program per latent block covers d (the bias needs no x).
        d_blocks = triton.cdiv(d_in, cfg["BLOCK_D"]) if need_w else 1
        scratch = grad_w if need_w else torch.empty(d_in, 1, dtype=W_enc.dtype, device=x.device)
        _latent_segment_grad_kernel[(n_blocks, d_blocks)](
            x, sorted_tokens, sorted_latents, sorted_grad, block_start,
            scratch, grad_b if need_b else scratch,
            d_in if need_w else 0, n_latents,
            x.stride(0), x.stride(1), scratch.stride(0), scratch.stride(1) if need_w else 0,
            DOT_PRECISION=dot_precision(x.dtype), WRITE_BIAS=need_b, **cfg,
        )
    return grad_x, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class TopKEncodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, splits=None):
        values, indices = topk_encode_forward(x, W_enc, b_enc, k, splits=splits)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, values, indices = ctx.saved_tensors
        # ReLU: a latent whose value was clamped to 0 passes no gradient.
        grad_pre = torch.where(values > 0, grad_values, torch.zeros_like(grad_values)).to(x.dtype)
        grad_x, grad_w, grad_b = sparse_encoder_backward(
            grad_pre, indices, x, W_enc, *ctx.needs_input_grad[:3])
        return grad_x, grad_w, grad_b, None, None


def topk_encode_triton(x2d: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                       splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused TopK encoder on validated 2-D inputs: (values [N, k] x.dtype, indices [N, k] int64).

    ``splits`` (latent ranges per row block) is chosen from the device when None.
    """
    return TopKEncodeTriton.apply(x2d, W_enc, b_enc, k, splits)
