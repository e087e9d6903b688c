"""topk_encode: values, indices = TopK(ReLU(x @ W_enc + b_enc)), without an [N, n_latents] tensor.

The PyTorch reference below is the spec and the CPU implementation. It walks the tokens in
chunks so that at most a [chunk, n_latents] block of pre-activations exists at a time, and its
backward works from the [N, k] sparse gradient alone. On CUDA the Triton kernel in
fastsae.kernels.topk_encoder does the same with the TopK fused into the GEMM epilogue.
"""

from __future__ import annotations

import torch

from fastsae.ops._backend import call_kernel, missing_triton, use_triton
from fastsae.ops.checks import check_k, check_same, check_shape, check_tensor, chunk_rows, encoder_operands
from fastsae.ops._sparse import accumulation_dtype, gather_rows_weighted, scatter_rows_weighted

try:  # the Triton kernels: triton is optional, without it the reference runs everywhere
    from fastsae.kernels import topk_encoder as kernels
except ImportError as error:
    kernels = missing_triton(error)


class TopKEncodeReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k):
        n_tokens, n_latents = x.shape[0], W_enc.shape[1]
        values = torch.empty(n_tokens, k, dtype=x.dtype, device=x.device)
        indices = torch.empty(n_tokens, k, dtype=torch.int64, device=x.device)
        step = chunk_rows(n_latents)
        for start in range(0, n_tokens, step):
            pre = torch.addmm(b_enc, x[start:start + step], W_enc)
            chunk_values, chunk_indices = pre.topk(k, dim=1)  # sorted, largest first
            values[start:start + step] = chunk_values.clamp_min(0)
            indices[start:start + step] = chunk_indices
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, values, indices = ctx.saved_tensors
        n_latents = W_enc.shape[1]
        # ReLU: a latent whose value was clamped to 0 passes no gradient.
        grad_pre = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gather_rows_weighted(grad_pre, indices, W_enc.t())
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows_weighted(grad_pre, indices, x, n_latents).t().to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n_latents, dtype=accumulation_dtype(W_enc.dtype), device=x.device)
            grad_b.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1).to(grad_b.dtype))
            grad_b = grad_b.to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest ReLU activations of ``x @ W_enc + b_enc`` per token.

    x: [..., d_in]; W_enc: [d_in, n_latents]; b_enc: [n_latents].
    Returns (values [..., k] in x's dtype, largest first, >= 0; indices [..., k] int64).
    Differentiable with respect to x, W_enc and b_enc. Ties may pick any of the tied latents.
    """
    check_tensor("x", x, min_ndim=1, float_dtype=True)
    check_tensor("W_enc", W_enc, ndim=2, float_dtype=True)
    check_tensor("b_enc", b_enc, ndim=1, float_dtype=True)
    d_in, n_latents = W_enc.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in} (W_enc is {tuple(W_enc.shape)}), "
                         f"got shape {tuple(x.shape)}")
    check_shape("b_enc", b_enc, (n_latents,), "n_latents")
    check_same("x", x, W_enc=W_enc, b_enc=b_enc)
    check_k(k, n_latents)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, d_in)
    if use_triton("topk_encode", kernels, x2d, W_enc, b_enc, backend=backend):
        values, indices = call_kernel(kernels.topk_encode_triton, *encoder_operands(x2d, W_enc), b_enc, k)
    else:
        values, indices = TopKEncodeReference.apply(x2d, W_enc, b_enc, k)
    return values.reshape(*leading, k), indices.reshape(*leading, k)
