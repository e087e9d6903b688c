"""Inputs and tolerances shared by the encoder kernels' tests (test_topk_encoder, test_relu_encoder)."""

import torch
from conftest import KERNEL_DEVICE

# dtypes the CPU (interpreter) tests run in; GPU tests add bf16.
DTYPES = [torch.float32, torch.float16]
# Tolerance on values and gradients, relative to the largest magnitude involved.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(n_tokens, d_in, n_latents, dtype, device=KERNEL_DEVICE, bias_shift=0.0):
    """x [N, d_in], W_enc [d_in, n_latents] (columns of norm ~1), b_enc [n_latents] around bias_shift."""
    x = torch.randn(n_tokens, d_in, device=device).to(dtype)
    W = (torch.randn(d_in, n_latents, device=device) / d_in ** 0.5).to(dtype)
    b = (0.1 * torch.randn(n_latents, device=device) + bias_shift).to(dtype)
    return x, W, b
