"""ReLU encoder: acts = ReLU(x @ W_enc + b_enc), one GEMM with bias + ReLU in its epilogue.

Forward (`_relu_encode_fwd_kernel`): a tiled GEMM, fp32 accumulation, grouped program order so
that programs running together share x rows and W_enc columns in L2; the epilogue adds the bias,
applies the ReLU and stores [N, n_latents] in x's dtype. The GEMM + bias tile is the TopK
encoder's (kernels/_tiles.py: encoder_preactivation_tile).

Backward, two paths (``sparse_backward``):
- sparse (the default): uses the code's runtime sparsity with no [N, n] temporary and no host
  sync. `compact_active_kernel` reads acts and grad_acts once and writes each row's active
  entries (acts > 0) into a capacity-bounded code (values [N, C], indices [N, C], C =
  sparse_capacity(n_latents)) plus each row's count, on the device. The TopK encoder's sparse
  kernels (kernels/_sparse_code.py: sparse_encoder_backward) then produce all three gradients
  from it, with work proportional to the active entries; a row with more than C active latents
  (a dense code early in training) is recognised by its count inside those kernels and computed
  from grad_acts and acts directly, by tensor-core tiles (DenseRows). No decision is read back
  to the host, so the step never waits on the GPU.
- dense (``sparse_backward=False``): grad_pre = grad * (acts > 0) in one [N, n] buffer
  (`_relu_grad_kernel`), then grad_x = grad_pre @ W_enc^T, grad_W_enc = x^T @ grad_pre (cuBLAS
  GEMMs through torch), grad_b_enc = the fp32 column sum of grad_pre.
A ReLU SAE's code is dense at initialisation and sparse (tens of latents out of tens of thousands
per token) after the first steps of training: the sparse path handles both, its per-row
fallback costing about what the dense GEMMs would for the rows that take it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsae.kernels._common import gpu_arch, matmul_mode
from fastsae.kernels._sparse_code import compact_active, sparse_capacity, sparse_encoder_backward
from fastsae.kernels._tiles import (ENCODER_TILE_CONFIGS, GROUP_M, INTERPRETER_ENCODER_TILE_CONFIG,
                                    encoder_preactivation_tile, grouped_tile)


@triton.jit
def _relu_encode_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    n_tokens, d_in, n_latents,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    MATMUL_MODE: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks sweep the latent blocks together, so a W_enc tile is read
    # from DRAM once per group rather than once per row block.
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_tokens, n_latents, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_tokens
    col_ok = cols < n_latents

    pre = encoder_preactivation_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, d_in,
                                     stride_xm, stride_xd, stride_wd, stride_wn,
                                     BLOCK_M, BLOCK_N, BLOCK_D, MATMUL_MODE)
    acts = tl.maximum(pre, 0.0)
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    tl.store(out, acts.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])



def relu_encode_forward(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    n_tokens, d_in = x.shape
    b_enc = b_enc.contiguous()  # the kernel reads the bias at unit stride
    n_latents = W_enc.shape[1]
    cfg = ENCODER_TILE_CONFIGS[x.dtype] if gpu_arch(x.device) is not None else INTERPRETER_ENCODER_TILE_CONFIG
    block_m, block_n, block_d, num_warps, num_stages = cfg
    acts = torch.empty(n_tokens, n_latents, dtype=x.dtype, device=x.device)
    if acts.numel() == 0:  # an empty batch: nothing to launch
        return acts
    grid = (triton.cdiv(n_tokens, block_m) * triton.cdiv(n_latents, block_n),)
    _relu_encode_fwd_kernel[grid](
        x_ptr=x, w_ptr=W_enc, b_ptr=b_enc, out_ptr=acts, n_tokens=n_tokens, d_in=d_in, n_latents=n_latents,
        stride_xm=x.stride(0), stride_xd=x.stride(1), stride_wd=W_enc.stride(0), stride_wn=W_enc.stride(1),
        stride_om=acts.stride(0), stride_on=acts.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GROUP_M=GROUP_M,
        MATMUL_MODE=matmul_mode(x.dtype), num_warps=num_warps, num_stages=num_stages,
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
# 256 contiguous elements (tests/compile_check.py).
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



class ReLUEncodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, sparse_backward=True):
        acts = relu_encode_forward(x, W_enc, b_enc)
        ctx.save_for_backward(x, W_enc, acts)
        ctx.sparse_backward = sparse_backward
        return acts

    @staticmethod
    def backward(ctx, grad_acts):
        x, W_enc, acts = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if acts.numel() == 0:  # an empty batch: empty grad_x, zero grad_W_enc / grad_b_enc
            return (torch.zeros_like(x) if need_x else None, torch.zeros_like(W_enc) if need_w else None,
                    torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=x.device) if need_b else None, None)
        if ctx.sparse_backward:
            values, indices, dense_rows = compact_active(grad_acts, acts, sparse_capacity(acts.shape[1]))
            grad_x, grad_w, grad_b = sparse_encoder_backward(values, indices, x, W_enc, need_x, need_w, need_b,
                                                             dense_rows=dense_rows)
        else:
            grad_pre = relu_grad(grad_acts, acts)  # one N x n buffer, no zeros tensor or bool mask
            grad_x = grad_pre @ W_enc.t() if need_x else None
            grad_w = None
            if need_w:  # computed in W_enc's storage order, so autograd accumulates it without a copy
                grad_w = (grad_pre.t() @ x).t() if W_enc.stride(0) == 1 else x.t() @ grad_pre
            # dtype=: fp32 accumulation without an fp32 copy of grad_pre (N x n) for 16-bit inputs.
            grad_b = grad_pre.sum(0, dtype=torch.float32).to(W_enc.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None


def relu_encode_triton(x2d: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, *,
                       sparse_backward: bool | None = None) -> torch.Tensor:
    """Fused ReLU encoder on validated 2-D inputs: acts [N, n_latents] in x's dtype.

    sparse_backward: None or True take the sparse backward (compact code, dense fallback per row
    inside the kernels, no host sync); False the dense one (cuBLAS GEMMs on an [N, n] gradient).
    """
    return ReLUEncodeTriton.apply(x2d, W_enc, b_enc, sparse_backward is not False)
