"""sparse_decode: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec, and its dense twin.

The reference gathers k decoder rows per token (never a dense [N, n_latents] scatter) and its
backward is the spec the Triton kernel in fastsae.kernels.sparse_decoder follows:
grad_values = <grad_out, W_dec[idx]>, grad_W_dec = a per-latent sum of value * grad_out in fp32,
grad_b_dec = grad_out summed over tokens.
"""

from __future__ import annotations

import torch

from fastsae.ops._backend import call_kernel, missing_triton, use_triton
from fastsae.ops.checks import check_indices, check_same, check_shape, check_tensor
from fastsae.ops._sparse import accumulation_dtype, gather_rows_weighted, row_dots, scatter_rows_weighted

try:  # the Triton kernels: triton is optional, without it the reference runs everywhere
    from fastsae.kernels import sparse_decoder as kernels
except ImportError as error:
    kernels = missing_triton(error)


class SparseDecodeReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, b_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return gather_rows_weighted(values, indices, W_dec) + b_dec

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(grad_out, indices, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_rows_weighted(values, indices, grad_out, W_dec.shape[0]).to(W_dec.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.to(accumulation_dtype(W_dec.dtype)).sum(0).to(W_dec.dtype)
        return grad_values, None, grad_W, grad_b


def _check_decoder(W_dec: torch.Tensor, b_dec: torch.Tensor) -> None:
    check_tensor("W_dec", W_dec, ndim=2, float_dtype=True)
    check_tensor("b_dec", b_dec, ndim=1, float_dtype=True)
    check_shape("b_dec", b_dec, (W_dec.shape[1],), "d_out, W_dec's columns")


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                  *, backend: str | None = None) -> torch.Tensor:
    """Reconstruction from a TopK code. values, indices: [..., k]; W_dec: [n_latents, d_out]; b_dec:
    [d_out] (d_out = d_in for an SAE; a transcoder's may differ).

    Returns [..., d_out] in W_dec's dtype. Differentiable with respect to values, W_dec, b_dec.
    """
    check_tensor("values", values, min_ndim=1, float_dtype=True)
    check_tensor("indices", indices, min_ndim=1)
    _check_decoder(W_dec, b_dec)
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    check_indices("indices", indices, W_dec.shape[0])
    check_same("W_dec", W_dec, values=values, b_dec=b_dec)
    if indices.device != W_dec.device:
        raise ValueError(f"indices is on {indices.device} but W_dec is on {W_dec.device}")
    k = values.shape[-1]
    values2d, indices2d = values.reshape(-1, k), indices.reshape(-1, k).long()
    if use_triton("sparse_decode", kernels, values2d, W_dec, b_dec, backend=backend):
        out = call_kernel(kernels.sparse_decode_triton, values2d, indices2d, W_dec, b_dec)
    else:
        out = SparseDecodeReference.apply(values2d, indices2d, W_dec, b_dec)
    return out.reshape(*values.shape[:-1], W_dec.shape[1])


def dense_decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, *,
                 backend: str | None = None) -> torch.Tensor:
    """Reconstruction from a dense (ReLU) code: acts @ W_dec + b_dec. acts: [..., n_latents]; W_dec:
    [n_latents, d_out]; b_dec: [d_out]. Returns [..., d_out] in W_dec's dtype.

    The Triton path may exploit the zeros of a sparse ReLU code; the reference is one addmm.
    """
    check_tensor("acts", acts, min_ndim=1, float_dtype=True)
    _check_decoder(W_dec, b_dec)
    n_latents, d_out = W_dec.shape
    if acts.shape[-1] != n_latents:
        raise ValueError(f"acts must have last dimension n_latents={n_latents}, got shape {tuple(acts.shape)}")
    check_same("W_dec", W_dec, acts=acts, b_dec=b_dec)
    acts2d = acts.reshape(-1, n_latents)
    if use_triton("dense_decode", kernels, acts2d, W_dec, b_dec, backend=backend):
        out = call_kernel(kernels.dense_decode_triton, acts2d, W_dec, b_dec)
    else:
        out = torch.addmm(b_dec, acts2d, W_dec)
    return out.reshape(*acts.shape[:-1], d_out)
