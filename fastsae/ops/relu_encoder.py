"""relu_encode: ReLU(x @ W_enc + b_enc), the code of a ReLU SAE (dense by construction).

The reference is one addmm and a ReLU; autograd's backward is the spec. The Triton kernel in
fastsae.kernels.relu_encoder fuses bias and ReLU into the GEMM epilogue.
"""

from __future__ import annotations

import torch

from fastsae.ops._backend import call_kernel, missing_triton, use_triton
from fastsae.ops.checks import check_same, check_shape, check_tensor, encoder_operands

try:  # the Triton kernels: triton is optional, without it the reference runs everywhere
    from fastsae.kernels import relu_encoder as kernels
except ImportError as error:
    kernels = missing_triton(error)


def relu_encode_reference(x2d: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.addmm(b_enc, x2d, W_enc))


def relu_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """ReLU(x @ W_enc + b_enc). x: [..., d_in] -> [..., n_latents] in x's dtype."""
    check_tensor("x", x, min_ndim=1, float_dtype=True)
    check_tensor("W_enc", W_enc, ndim=2, float_dtype=True)
    check_tensor("b_enc", b_enc, ndim=1, float_dtype=True)
    d_in, n_latents = W_enc.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in} (W_enc is {tuple(W_enc.shape)}), "
                         f"got shape {tuple(x.shape)}")
    check_shape("b_enc", b_enc, (n_latents,), "n_latents")
    check_same("x", x, W_enc=W_enc, b_enc=b_enc)
    x2d = x.reshape(-1, d_in)
    if use_triton("relu_encode", kernels, x2d, W_enc, b_enc, backend=backend):
        acts = call_kernel(kernels.relu_encode_triton, *encoder_operands(x2d, W_enc), b_enc)
    else:
        acts = relu_encode_reference(x2d, W_enc, b_enc)
    return acts.reshape(*x.shape[:-1], n_latents)
