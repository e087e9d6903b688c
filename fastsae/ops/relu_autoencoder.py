"""relu_autoencode: a ReLU / JumpReLU SAE's training pass without the [N, n_latents] code.

    out = relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=None, bandwidth=None, p=1.0)
    pre = x @ W_enc + b_enc;  code = relu(pre) * (pre > threshold)   (threshold None: plain ReLU)
    out.reconstruction = code @ W_dec + b_dec;  out.lp_sum = sum_j |code_j|^p;
    out.l0 = active latents per token;  out.fired = bool [n_latents], active on any token

The reference walks the tokens in chunks and recomputes each chunk's pre-activations in backward,
so at most a [chunk, n_latents] block exists (never [N, n_latents]). JumpReLU's threshold gets the
straight-through pseudo-derivatives of Rajamanoharan et al. 2024 (rect(u) = 1 for |u| < 1/2):
d code_j / d theta_j = -(theta_j / eps) rect((pre_j - theta_j) / eps) and
d l0 / d theta_j = -(1 / eps) rect((pre_j - theta_j) / eps); pre gets d code / d pre = 1 where
active, and no gradient through l0. The Lp sum's gradient at a zero code is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastsae.ops._checks import check_same, check_shape, check_tensor, chunk_rows
from fastsae.ops._sparse import accumulation_dtype


class ReLUAutoencodeOutput(NamedTuple):
    reconstruction: torch.Tensor  # [..., d_in], W_dec's dtype
    lp_sum: torch.Tensor  # [...], fp32 (fp64 for fp64 inputs): sum_j |code_j|^p
    l0: torch.Tensor  # [...], the same dtype: active latents (differentiable w.r.t. the threshold)
    fired: torch.Tensor  # bool [n_latents]


def _chunk_code(x, W_enc, b_enc, threshold):
    pre = torch.addmm(b_enc, x, W_enc)
    active = pre > 0
    if threshold is not None:
        active &= pre > threshold
    return pre, active, torch.where(active, pre, torch.zeros_like(pre))


class ReLUAutoencodeReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, p):
        n_tokens, n_latents = x.shape[0], W_enc.shape[1]
        reconstruction = torch.empty(n_tokens, W_dec.shape[1], dtype=W_dec.dtype, device=x.device)
        acc = accumulation_dtype(x.dtype)
        lp_sum = torch.empty(n_tokens, dtype=acc, device=x.device)
        l0 = torch.empty(n_tokens, dtype=acc, device=x.device)
        fired = torch.zeros(n_latents, dtype=torch.bool, device=x.device)
        step = chunk_rows(n_latents)
        for start in range(0, n_tokens, step):
            rows = slice(start, start + step)
            _, active, code = _chunk_code(x[rows], W_enc, b_enc, threshold)
            reconstruction[rows] = torch.addmm(b_dec, code.to(W_dec.dtype), W_dec)
            lp_sum[rows] = code.to(acc).pow(p).sum(-1) if p != 1 else code.to(acc).sum(-1)
            l0[rows] = active.sum(-1, dtype=acc)
            fired |= active.any(0)
        ctx.save_for_backward(x, W_enc, b_enc, W_dec, threshold)
        ctx.bandwidth, ctx.p = bandwidth, p
        ctx.mark_non_differentiable(fired)
        return reconstruction, lp_sum, l0, fired

    @staticmethod
    def backward(ctx, grad_reconstruction, grad_lp_sum, grad_l0, _grad_fired):
        x, W_enc, b_enc, W_dec, threshold = ctx.saved_tensors
        eps, p = ctx.bandwidth, ctx.p
        acc = accumulation_dtype(x.dtype)
        n_tokens, n_latents = x.shape[0], W_enc.shape[1]
        grad_x = torch.empty_like(x)
        grad_W_enc = torch.zeros(W_enc.shape, dtype=acc, device=x.device)
        grad_b_enc = torch.zeros(n_latents, dtype=acc, device=x.device)
        grad_W_dec = torch.zeros(W_dec.shape, dtype=acc, device=x.device)
        trained_threshold = threshold is not None and ctx.needs_input_grad[5]
        grad_theta = torch.zeros(n_latents, dtype=acc, device=x.device) if trained_threshold else None
        grad_reconstruction = grad_reconstruction.to(acc)
        step = chunk_rows(n_latents)
        for start in range(0, n_tokens, step):
            rows = slice(start, start + step)
            pre, active, code = _chunk_code(x[rows], W_enc, b_enc, threshold)
            pre, code = pre.to(acc), code.to(acc)
            g_out = grad_reconstruction[rows]
            grad_code = g_out @ W_dec.to(acc).t()
            if grad_lp_sum is not None:  # d/dz z^p = p z^(p-1) where z > 0, 0 at z = 0
                slope = torch.ones_like(code) if p == 1 else p * code.where(active, torch.ones_like(code)).pow(p - 1)
                grad_code += grad_lp_sum[rows, None].to(acc) * torch.where(active, slope, torch.zeros_like(slope))
            grad_pre = torch.where(active, grad_code, torch.zeros_like(grad_code))
            grad_x[rows] = (grad_pre @ W_enc.to(acc).t()).to(x.dtype)
            grad_W_enc += x[rows].to(acc).t() @ grad_pre
            grad_b_enc += grad_pre.sum(0)
            grad_W_dec += code.t() @ g_out
            if grad_theta is not None:
                theta = threshold.to(acc)
                window = ((pre - theta).abs() < eps / 2).to(acc)  # rect((pre - theta) / eps)
                grad_theta -= (theta / eps) * (window * grad_code).sum(0)
                if grad_l0 is not None:
                    grad_theta -= (window * grad_l0[rows, None].to(acc)).sum(0) / eps
        grad_b_dec = grad_reconstruction.sum(0).to(W_dec.dtype)
        grad_theta = None if grad_theta is None else grad_theta.to(threshold.dtype)
        return (grad_x, grad_W_enc.to(W_enc.dtype), grad_b_enc.to(b_enc.dtype), grad_W_dec.to(W_dec.dtype),
                grad_b_dec, grad_theta, None, None)


def relu_autoencode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, *, threshold: torch.Tensor | None = None, bandwidth: float | None = None,
                    p: float = 1.0, backend: str | None = None) -> ReLUAutoencodeOutput:
    """A ReLU (threshold None) or JumpReLU SAE's reconstruction and code statistics; see the module
    docstring. x: [..., d_in]; W_enc: [d_in, n]; b_enc, threshold: [n]; W_dec: [n, d_in] (already
    normalised where the SAE normalises it); b_dec: [d_in]. bandwidth: the straight-through
    estimator's width, required with a threshold that needs a gradient."""
    check_tensor("x", x, min_ndim=1, float_dtype=True)
    check_tensor("W_enc", W_enc, ndim=2, float_dtype=True)
    check_tensor("W_dec", W_dec, ndim=2, float_dtype=True)
    d_in, n_latents = W_enc.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in} (W_enc is {tuple(W_enc.shape)}), "
                         f"got shape {tuple(x.shape)}")
    check_shape("b_enc", b_enc, (n_latents,), "n_latents")
    check_shape("W_dec", W_dec, (n_latents, d_in), "n_latents, d_in")
    check_shape("b_dec", b_dec, (d_in,), "d_in")
    check_same("x", x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold)
    if threshold is not None:
        check_shape("threshold", threshold, (n_latents,), "n_latents")
        if threshold.requires_grad and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive number for a trained threshold, got {bandwidth!r}")
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p!r}")
    x2d = x.reshape(-1, d_in)
    out = ReLUAutoencodeReference.apply(x2d, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, float(p))
    leading = x.shape[:-1]
    return ReLUAutoencodeOutput(out[0].reshape(*leading, d_in), out[1].reshape(leading), out[2].reshape(leading),
                                out[3])
