"""ReLU encoder: acts = ReLU(x @ W_enc + b_enc), one GEMM with bias + ReLU in its epilogue.

Forward (`_relu_encode_fwd_kernel`): a tiled GEMM, fp32 accumulation, grouped program order so
that programs running together share x rows and W_enc columns in L2; the epilogue adds the bias,
applies the ReLU and stores [N, n_latents] in x's dtype. The GEMM + bias tile is the TopK
encoder's (kernels/topk_encoder.py: encoder_preactivation_tile).

Backward forms grad_pre = grad * (acts > 0) with `_relu_grad_kernel` (one [N, n] output, no
mask or zeros tensor; see relu_grad), then picks one of two paths by the measured sparsity:
- dense: grad_x = grad_pre @ W_enc^T, grad_W_enc = x^T @ grad_pre (cuBLAS GEMMs through torch),
  grad_b_enc = the fp32 column sum of grad_pre;
- sparse: each row's nonzeros of grad_pre are compacted into (values, indices) padded to the
  widest row, and the TopK encoder's sparse backward kernels
  (fastsae.kernels.topk_encoder.sparse_encoder_backward) produce all three gradients with work
  proportional to the nonzeros instead of N * n_latents * d_in.
A ReLU SAE's code is dense at initialisation and sparse (tens of latents out of tens of thousands
per token) after the first steps of training, so both paths are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsae.kernels.topk_encoder import dot_precision, encoder_preactivation_tile, sparse_encoder_backward

# Sparse backward when (widest row's nonzeros) / n_latents is at most this. Set from the GUIDE's
# cost model, not measured (no GPU was available when this was written; re-measure with
# benchmarks/bench_relu_encoder.py on a GPU and update). Dense: two GEMMs of 2*N*n*d FLOPs at
# ~600 TFLOP/s on an H100. Sparse: the gather and segmented reduction move about
# 2 * N * L * d elements (L = padded row width) at ~2.5 TB/s, with up to 8x sector waste on the
# strided W_enc column gather, plus one pass over grad_pre to compact it. Break-even is near
# L / n = 2e-3; 1e-3 leaves margin for the compaction pass and the host sync that reads L.
SPARSE_DENSITY_THRESHOLD = 1e-3


@triton.jit
def _relu_encode_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    n_tokens, d_in, n_latents,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks sweep the latent blocks together, so a W_enc tile is read
    # from DRAM once per group rather than once per row block.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_tokens, BLOCK_M)
    n_col_blocks = tl.cdiv(n_latents, BLOCK_N)
    programs_per_group = GROUP_M * n_col_blocks
    group = pid // programs_per_group
    first_row_block = group * GROUP_M
    group_size = tl.minimum(n_row_blocks - first_row_block, GROUP_M)
    pid_m = first_row_block + (pid % programs_per_group) % group_size
    pid_n = (pid % programs_per_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    col_ok = cols < n_latents

    pre = encoder_preactivation_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, d_in,
                                     stride_xm, stride_xd, stride_wd, stride_wn,
                                     BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acts = tl.maximum(pre, 0.0)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    tl.store(out, acts.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per input dtype; compile-checked for
# sm_80/sm_90 in tests/test_relu_encoder.py. fp32 tiles are twice the bytes: half the BLOCK_D.
FWD_CONFIGS = {
    torch.float16: (128, 128, 64, 8, 3),
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float32: (128, 128, 32, 8, 3),
}
GROUP_M = 8
# The interpreter (CPU tests) pays per program and per tile op, not per element: small tiles.
INTERPRETER_FWD_CONFIG = (16, 32, 32, 4, 1)


def relu_encode_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    n_tokens, d_in = x.shape
    n_latents = W_enc.shape[1]
    cfg = FWD_CONFIGS[x.dtype] if x.is_cuda else INTERPRETER_FWD_CONFIG
    block_m, block_n, block_d, num_warps, num_stages = cfg
    acts = torch.empty(n_tokens, n_latents, dtype=x.dtype, device=x.device)
    if acts.numel() == 0:  # an empty batch: nothing to launch
        return acts
    grid = (triton.cdiv(n_tokens, block_m) * triton.cdiv(n_latents, block_n),)
    _relu_encode_fwd_kernel[grid](
        x, W_enc, b_enc, acts,
        n_tokens, d_in, n_latents,
        x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), acts.stride(0), acts.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GROUP_M=GROUP_M,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return acts


@triton.jit
def _relu_grad_kernel(grad_ptr, acts_ptr, out_ptr, n_tokens, n_latents, stride_gm, stride_gn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = grad where acts > 0, else 0 (also where grad is not finite, like torch.where).

    acts and out are [N, n] contiguous; grad may have any strides (autograd hands backward an
    expanded stride-0 tensor for acts.sum(), for instance). grad is read only where acts > 0.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = (rows < n_tokens)[:, None] & (cols < n_latents)[None, :]
    rows64 = rows.to(tl.int64)  # N * n passes 2^31 long before N does
    dense = rows64[:, None] * n_latents + cols[None, :]
    acts = tl.load(acts_ptr + dense, mask=in_range, other=0.0)
    live = in_range & (acts > 0)
    grad = tl.load(grad_ptr + rows64[:, None] * stride_gm + cols.to(tl.int64)[None, :] * stride_gn,
                   mask=live, other=0.0)
    tl.store(out_ptr + dense, grad.to(out_ptr.dtype.element_ty), mask=in_range)


# [BLOCK_M, BLOCK_N] of the masking kernel: 4,096 elements, 32 per thread on 4 warps, each row
# 256 contiguous elements (compile-checked in tests/test_relu_encoder.py).
RELU_GRAD_CONFIG = dict(BLOCK_M=16, BLOCK_N=256, num_warps=4)


def relu_grad(grad_acts: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """grad_pre = grad_acts * (acts > 0), as a fresh [N, n] tensor in grad_acts' dtype.

    One N x n allocation, the output, and one pass. The alternatives cost more:
    torch.where(acts > 0, grad_acts, torch.zeros_like(grad_acts)) allocates a zeros tensor, a bool
    mask and the output; torch.where(mask, grad, 0) and grad.masked_fill(acts <= 0, 0) still
    allocate the N x n bool mask beside the output (and make two passes). Masking grad_acts in place
    would allocate nothing but is not safe: autograd may hand the same gradient tensor to other
    nodes (acts + y sends one tensor to both), pass the caller's own tensor (acts.backward(g)), or
    an expanded stride-0 one (acts.sum()); backward must not write to it.
    """
    acts = acts.contiguous()  # the forward's output: already contiguous, no copy
    out = torch.empty(acts.shape, dtype=grad_acts.dtype, device=acts.device)
    if out.numel() == 0:
        return out
    cfg = dict(RELU_GRAD_CONFIG)
    grid = (triton.cdiv(acts.shape[0], cfg["BLOCK_M"]), triton.cdiv(acts.shape[1], cfg["BLOCK_N"]))
    _relu_grad_kernel[grid](grad_acts, acts, out, acts.shape[0], acts.shape[1],
                            grad_acts.stride(0), grad_acts.stride(1), **cfg)
    return out


def compact_rows(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, L], indices [N, L]) holding each row's nonzeros, L = the widest row's count.

    Shorter rows are padded with value 0 at latent 0, which every consumer treats as no entry.
    """
    n_tokens = dense.shape[0]
    rows, cols = dense.nonzero(as_tuple=True)  # row-major order: each row's entries together
    counts = torch.bincount(rows, minlength=n_tokens)
    width = max(1, int(counts.max())) if rows.numel() else 1
    row_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=dense.device) - row_start[rows]
    values = torch.zeros(n_tokens, width, dtype=dense.dtype, device=dense.device)
    indices = torch.zeros(n_tokens, width, dtype=torch.int64, device=dense.device)
    values[rows, slot] = dense[rows, cols]
    indices[rows, slot] = cols
    return values, indices


def choose_sparse_backward(grad_pre: torch.Tensor) -> bool:
    """Whether the widest row's nonzeros are a small enough share of n_latents (reads back 1 int)."""
    widest = int((grad_pre != 0).sum(dim=1).max()) if grad_pre.numel() else 0
    return widest <= SPARSE_DENSITY_THRESHOLD * grad_pre.shape[1]


class ReLUEncodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, sparse_backward=None):
        acts = relu_encode_forward(x, W_enc, b_enc)
        ctx.save_for_backward(x, W_enc, acts)
        ctx.sparse_backward = sparse_backward
        return acts

    @staticmethod
    def backward(ctx, grad_acts):
        x, W_enc, acts = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_pre = relu_grad(grad_acts, acts)  # one N x n buffer, no zeros tensor or bool mask
        sparse = ctx.sparse_backward
        if sparse is None:
            sparse = choose_sparse_backward(grad_pre)
        if sparse:
            values, indices = compact_rows(grad_pre)
            grad_x, grad_w, grad_b = sparse_encoder_backward(values, indices, x, W_enc,
                                                             need_x, need_w, need_b)
        else:
            grad_x = grad_pre @ W_enc.t() if need_x else None
            grad_w = x.t() @ grad_pre if need_w else None
            # dtype=: fp32 accumulation without an fp32 copy of grad_pre (N x n) for 16-bit inputs.
            grad_b = grad_pre.sum(0, dtype=torch.float32).to(W_enc.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None


def relu_encode_triton(x2d: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, *,
                       sparse_backward: bool | None = None) -> torch.Tensor:
    """Fused ReLU encoder on validated 2-D inputs: acts [N, n_latents] in x's dtype.

    sparse_backward: None picks the backward path from the gradient's measured density
    (SPARSE_DENSITY_THRESHOLD); True / False force the sparse / dense path.
    """
    return ReLUEncodeTriton.apply(x2d, W_enc, b_enc, sparse_backward)
