"""relu_autoencode: a ReLU or JumpReLU SAE from input to reconstruction, with the code's Lp sum and
L0, and no [N, n_latents] tensor at any density.

    pre  = x @ W_enc + b_enc
    code = relu(pre)                          (threshold None)
         = relu(pre) * (pre > threshold)      (JumpReLU; threshold [n] > 0)
    reconstruction = code @ W_dec + b_dec,  lp_sum = sum_j |code_j|^p,  l0 = #(code_j > 0),
    fire_counts = the tokens each latent is active on.

The code itself is never returned: a training step needs only these four, and a ReLU SAE's code
is an [N, n] tensor that is dense at initialisation and 99.9 % zeros later. (E2ESAE.encode still
builds a dense code for a user who asks, with relu_encode.)

Gradients: all of them, with JumpReLU's straight-through estimator as Rajamanoharan et al. 2024
and SAELens train it (rect(u) = 1 for -1/2 < u < 1/2, bandwidth eps):
    d code / d pre = H(pre - theta)         d code / d theta = -(theta / eps) rect((pre - theta) / eps)
    d l0 / d pre = 0                        d l0 / d theta = -(1 / eps) rect((pre - theta) / eps)
A ReLU's l0 has no gradient. The derivative of the code passes where not (pre <= threshold), as
torch.relu's backward (a NaN pre-activation passes its gradient); d |c|^p / d c = p |c|^(p-1) for
c > 0 and 0 at 0, as torch.linalg.vector_norm's backward.

The caller forms the loss terms: the Lp norm is lp_sum ** (1 / p) (a sharded SAE sums lp_sum over
its shards first), the paper's sparsity term its mean over tokens / d_in; decoder_norm="forward"
passes W_dec already scaled (W_dec * scale[:, None]).

The reference below is the spec and the CPU path. It walks the tokens in chunks of
chunk_rows(4 * n_latents) (the few [chunk, n] temporaries alive at once hold about CHUNK_ELEMENTS
together) and keeps each token's code in one of two forms, as the Triton kernels do
(kernels/relu_autoencoder.py): a sparse row (at most reference_capacity(n) held entries: active,
and for JumpReLU inside the threshold's band, whose entries the threshold's gradient needs) as a
list of (token, latent, value) entries, decoded and differentiated entry by entry; a dense row
(more entries, or a NaN) not at all: its code is recomputed from x in backward, as a fused MLP
does. Peak memory: the chunk temporaries, the entry list (at most N * reference_capacity(n)) and
parameter-sized gradient accumulators. memory_estimate() is fastsae plan's model of both paths.

Non-finite inputs: a NaN pre-activation makes its row dense, where the products spread it as the
dense form's do (that token's reconstruction, lp_sum and grad_x; every latent's weight gradients).
The sparse rows form products over their held entries only: 0 * inf with an inf decoder weight
of an inactive latent is not formed, as in any sparse decoder.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastsae.ops._backend import call_kernel, register_kernel, use_triton
from fastsae.ops import _checks
from fastsae.ops._checks import check_same, check_shape, check_tensor, chunk_rows, encoder_operands
from fastsae.ops._sparse import accumulation_dtype

register_kernel("relu_autoencode", "relu_autoencoder", "relu_autoencode_triton")


class ReLUAutoencodeOutput(NamedTuple):
    """What relu_autoencode returns (leading dimensions [...] are x's)."""

    reconstruction: torch.Tensor  # [..., d_in] in W_dec's dtype
    lp_sum: torch.Tensor  # [...] fp32 (fp64 for fp64 inputs): sum_j |code_j|^p, differentiable
    l0: torch.Tensor  # [...] same dtype: active latents; differentiable in the threshold (JumpReLU)
    fire_counts: torch.Tensor  # [n_latents] int32: the tokens on which each latent is active


# A row is kept as entries when it holds at most this many (the kernels' rule, with their
# capacity kernels.relu_encoder.sparse_capacity); a denser one is recomputed in backward.
REFERENCE_CAPACITY_FRACTION = 1 / 256
REFERENCE_MIN_CAPACITY = 64


def reference_capacity(n_latents: int) -> int:
    return max(1, min(n_latents, max(REFERENCE_MIN_CAPACITY, int(n_latents * REFERENCE_CAPACITY_FRACTION))))


# The kernels' dense-row workspaces ([N, W], two in backward) hold at most this many elements
# each: 4 x CHUNK_ELEMENTS (2^26 by default), read at call time so tests can shrink it.
WORKSPACE_CHUNKS = 4


def workspace_elements() -> int:
    return WORKSPACE_CHUNKS * _checks.CHUNK_ELEMENTS


def _code_(pre: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """The code, written over pre: relu(pre), or relu(pre) * (pre > theta). NaN stays NaN."""
    if theta is None:
        return pre.relu_()
    above = pre > theta
    return pre.relu_().mul_(above)


def _in_band(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """rect((pre - theta) / bandwidth) as a bool, as SAELens evaluates it (in at least fp32)."""
    acc = accumulation_dtype(pre.dtype)
    u = (pre.to(acc) - theta.to(acc)).div_(bandwidth)
    return (u > -0.5) & (u < 0.5)


def _abs_pow(v: torch.Tensor, p: float) -> torch.Tensor:
    return v.abs() if p == 1 else v.abs().pow(p)


def _add_lp_grad_(grad_code: torch.Tensor, code: torch.Tensor, grad_lp: torch.Tensor, p: float) -> torch.Tensor:
    """grad_code += grad_lp[:, None] * d|code|^p / d code, in place: p code^(p-1) where code > 0,
    0 at 0, NaN where code is NaN (code >= 0 or NaN; grad_lp [rows])."""
    if p == 1:
        grad_code.add_(torch.where(code > 0, grad_lp[:, None], 0))
    else:
        positive = code > 0
        grad_code.add_(torch.where(positive, code, 1).pow_(p - 1).mul_(p * grad_lp[:, None]).masked_fill_(~positive, 0))
    return grad_code.masked_fill_(code.isnan(), float("nan"))


class _Entries(NamedTuple):
    """The sparse rows' code as a list of entries (global token, latent, value, in the band)."""

    tokens: torch.Tensor  # int64 [E]
    latents: torch.Tensor  # int64 [E]
    values: torch.Tensor  # [E] x's dtype (0 for an entry held only for the threshold's band)
    band: torch.Tensor | None  # bool [E] (JumpReLU)


# The reference's chunks hold a quarter of CHUNK_ELEMENTS: about four [rows, width] temporaries are
# alive at once (pre-activations / code, the code's gradient, masks, a product), so together
# they stay near the budget.
def _rows_per_chunk(width: int) -> int:
    return chunk_rows(4 * width)


def _entry_steps(n_entries: int, width: int):
    """Slices of the entry list whose [entries, width] temporaries (up to eight alive at once in
    backward: gathered rows and their products) stay within the chunk budget together."""
    step = chunk_rows(8 * width)
    return (slice(start, start + step) for start in range(0, n_entries, step))


class ReLUAutoencodeReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, theta, bandwidth, p):
        n_tokens, d_in = x.shape
        n_latents = W_enc.shape[1]
        acc = accumulation_dtype(x.dtype)
        capacity = reference_capacity(n_latents)
        reconstruction = torch.empty(n_tokens, d_in, dtype=W_dec.dtype, device=x.device)
        lp_sum = torch.empty(n_tokens, dtype=acc, device=x.device)
        l0 = torch.empty(n_tokens, dtype=acc, device=x.device)
        fire_counts = torch.zeros(n_latents, dtype=torch.int32, device=x.device)
        parts, dense_rows = [], []
        step = _rows_per_chunk(n_latents)
        for start in range(0, n_tokens, step):
            code = torch.addmm(b_enc, x[start:start + step], W_enc)
            band = None if theta is None else _in_band(code, theta, bandwidth)
            code = _code_(code, theta)
            held = code > 0  # active; NaN is held too but makes its row dense below
            counts = held.sum(1, dtype=torch.int32)  # (count_nonzero copies to int64: 7x slower)
            l0[start:start + step] = counts
            fire_counts += held.sum(0, dtype=torch.int32)
            if band is not None:
                held |= band
                counts = held.sum(1, dtype=torch.int32)
            dense = (counts > capacity) | code.sum(1).isnan()  # code >= 0: a NaN row sums to NaN
            sparse_rows = (~dense).nonzero().squeeze(1)
            rows, latents = (held if sparse_rows.numel() == held.shape[0] else held[sparse_rows]).nonzero(as_tuple=True)
            del held
            rows = sparse_rows[rows]
            values = code[rows, latents]
            parts.append(_Entries(rows + start, latents, values, None if band is None else band[rows, latents]))
            del band
            # The sparse rows: decoded entry by entry.
            out = torch.zeros(sparse_rows.numel(), d_in, dtype=acc, device=x.device)
            lp = torch.zeros(sparse_rows.numel(), dtype=acc, device=x.device)
            local = torch.searchsorted(sparse_rows, rows)
            for part in _entry_steps(values.numel(), d_in):
                v = values[part].to(acc)
                out.index_add_(0, local[part], v[:, None] * W_dec[latents[part]].to(acc))
                lp.index_add_(0, local[part], _abs_pow(v, p))
            reconstruction[sparse_rows + start] = (out + b_dec.to(acc)).to(W_dec.dtype)
            lp_sum[sparse_rows + start] = lp
            del out
            # The dense rows: one product; the code is dropped (recomputed in backward).
            dense_ids = dense.nonzero().squeeze(1)
            if dense_ids.numel():
                if dense_ids.numel() < code.shape[0]:
                    code = code[dense_ids]
                reconstruction[dense_ids + start] = torch.addmm(b_dec, code, W_dec)
                # code >= 0 (or NaN): |code|^1 is the code itself
                lp_sum[dense_ids + start] = (code.sum(1, dtype=acc) if p == 1 else _abs_pow(code.to(acc), p).sum(1))
                dense_rows.append(dense_ids + start)
            del code
        long = torch.zeros(0, dtype=torch.int64, device=x.device)
        entries = _Entries(torch.cat([e.tokens for e in parts]) if parts else long,
                           torch.cat([e.latents for e in parts]) if parts else long,
                           torch.cat([e.values for e in parts]) if parts else x.new_zeros(0),
                           None if theta is None else
                           torch.cat([e.band for e in parts]) if parts else long.bool())
        dense_rows = torch.cat(dense_rows) if dense_rows else long
        ctx.save_for_backward(x, W_enc, b_enc, W_dec, theta, dense_rows, *entries[:3],
                              *(() if entries.band is None else (entries.band,)))
        ctx.bandwidth, ctx.p = bandwidth, p
        ctx.mark_non_differentiable(fire_counts)
        if theta is None:
            ctx.mark_non_differentiable(l0)
        return reconstruction, lp_sum, l0, fire_counts

    @staticmethod
    def backward(ctx, grad_recon, grad_lp, grad_l0, _grad_fire_counts):
        x, W_enc, b_enc, W_dec, theta, dense_rows, tokens, latents, values, *band = ctx.saved_tensors
        band = band[0] if band else None
        bandwidth, p = ctx.bandwidth, ctx.p
        n_tokens, d_in = x.shape
        n_latents = W_enc.shape[1]
        acc = accumulation_dtype(x.dtype)
        device = x.device
        g = grad_recon.to(acc)
        grad_lp = grad_lp.to(acc)
        grad_l0 = grad_l0.to(acc) if theta is not None else None
        W_enc_t = W_enc.t()  # [n, d]: each latent's encoder weights as a row
        grad_x = torch.zeros(n_tokens, d_in, dtype=acc, device=device)
        grad_w_enc_t = torch.zeros(n_latents, d_in, dtype=acc, device=device)
        grad_b_enc = torch.zeros(n_latents, dtype=acc, device=device)
        grad_w_dec = torch.zeros(n_latents, d_in, dtype=acc, device=device)
        grad_theta = torch.zeros(n_latents, dtype=acc, device=device) if theta is not None else None

        # Sparse rows: the code's gradient at the held entries only.
        for part in _entry_steps(values.numel(), d_in):
            t, l = tokens[part], latents[part]
            v = values[part].to(acc)
            g_rows = g[t]
            grad_code = (g_rows * W_dec[l].to(acc)).sum(1)
            _add_lp_grad_(grad_code[:, None], v[:, None], grad_lp[t], p)
            grad_pre = torch.where(v > 0, grad_code, 0).to(x.dtype).to(acc)  # in x's dtype, as the kernel
            grad_x.index_add_(0, t, grad_pre[:, None] * W_enc_t[l].to(acc))
            grad_w_enc_t.index_add_(0, l, grad_pre[:, None] * x[t].to(acc))
            grad_b_enc.index_add_(0, l, grad_pre)
            grad_w_dec.index_add_(0, l, v[:, None] * g_rows)
            if theta is not None:
                term = -(theta[l].to(acc) / bandwidth) * grad_code - grad_l0[t] / bandwidth
                grad_theta.index_add_(0, l, torch.where(band[part], term, 0))
            del g_rows

        # Dense rows: the chunk's code recomputed from x.
        W_dec_t = W_dec.t().to(acc)
        step = _rows_per_chunk(n_latents)
        for start in range(0, dense_rows.numel(), step):
            rows = dense_rows[start:start + step]
            x_rows = x[rows]
            code = torch.addmm(b_enc, x_rows, W_enc)
            passes = ~(code <= (0 if theta is None else theta))  # NaN passes, as torch.relu's backward
            band = None if theta is None else _in_band(code, theta, bandwidth)
            code = _code_(code, theta).to(acc)
            grad_code = g[rows] @ W_dec_t
            if theta is None and p == 1 and not bool(code.isnan().any()):
                # d|c|/dc is 1 exactly where the gradient passes (c > 0): one in-place pass, masked below
                grad_code.add_(grad_lp[rows, None])
            else:
                _add_lp_grad_(grad_code, code, grad_lp[rows], p)
            if theta is not None:
                term = (-(theta.to(acc) / bandwidth) * grad_code).sub_(grad_l0[rows, None] / bandwidth)
                grad_theta += term.masked_fill_(~band, 0).sum(0)
                del term, band
            grad_pre = grad_code.masked_fill_(~passes, 0).to(x.dtype).to(acc)
            del passes
            grad_x[rows] = grad_pre @ W_enc_t.to(acc)
            grad_w_enc_t.addmm_(grad_pre.t(), x_rows.to(acc))
            grad_b_enc += grad_pre.sum(0)
            del grad_pre, grad_code
            grad_w_dec.addmm_(code.t(), g[rows])
            del code
        return (grad_x.to(x.dtype), grad_w_enc_t.t().to(W_enc.dtype), grad_b_enc.to(b_enc.dtype),
                grad_w_dec.to(W_dec.dtype), g.sum(0).to(W_dec.dtype),
                None if theta is None else grad_theta.to(theta.dtype), None, None)


class MemoryEstimate(NamedTuple):
    """Bytes one relu_autoencode call holds at its peak beyond the weights and their gradients."""

    code: int  # the code kept from forward to backward, and its per-entry backward temporaries
    workspaces: int  # the dense rows' workspaces (kernels) or the chunk temporaries (reference)


# Per slot of the kernels' compact code (C = kernels.relu_encoder.sparse_capacity(n) slots per
# token, within 16 of reference_capacity): value (s bytes) and int32 id kept from forward to
# backward; in backward the fp32 sampled dots, code and code gradient, a mask, the pre-activation
# gradient (s), the sort by latent (int64 order, three int32 token lists, int32 latents) and two
# sorted weight lists (s each). JumpReLU adds a band flag, the threshold's fp32 terms and their
# sorted copy.
_SLOT_BYTES = 4 + 4 + 4 + 4 + 1 + 8 + 12 + 4
_SLOT_BYTES_JUMP = 1 + 4 + 4 + 4
# The reference: about this many [rows, n] temporaries of a quarter CHUNK_ELEMENTS each are
# alive at its peak (measured: 3.5 with a dense code, 1.7 with a sparse one, fp32).
_REFERENCE_LIVE_CHUNKS = 4


def memory_estimate(n_tokens: int, n_latents: int, d_in: int, itemsize: int, *, jump: bool = False) -> MemoryEstimate:
    """What one call holds at its peak (forward and backward), the larger of the Triton path's and
    the reference's, for N = n_tokens: fastsae plan's model of a ReLU / JumpReLU SAE's memory.
    None of it is an [N, n_latents] tensor: the code costs O(N * n / 256), the workspaces a fixed
    budget (4 x CHUNK_ELEMENTS each in the kernels), whatever the density."""
    capacity = reference_capacity(n_latents) + 16
    per_slot = (3 * itemsize + 4 + _SLOT_BYTES + (_SLOT_BYTES_JUMP if jump else 0))
    kernel_code = n_tokens * capacity * per_slot + 13 * n_tokens
    # The reference's entries: token and latent (int64), value, band flag.
    reference_code = n_tokens * reference_capacity(n_latents) * (16 + itemsize + (1 if jump else 0))
    aligned = -(-n_latents // 128) * 128
    width = min(aligned, max(128, workspace_elements() // max(1, n_tokens) // 128 * 128))
    kernel_ws = n_tokens * width * (2 * itemsize + (4 if jump else 0))  # the pre-activations' gradient, the code
    kernel_ws += 4 * n_tokens * d_in if width < n_latents else 0  # fp32 grad_x across chunks
    rows = _rows_per_chunk(n_latents)
    reference_ws = _REFERENCE_LIVE_CHUNKS * min(rows, n_tokens) * n_latents * max(4, itemsize)
    reference_ws += max(4, itemsize) * n_tokens * d_in  # the fp32 grad_x accumulator
    return MemoryEstimate(max(kernel_code, reference_code), max(kernel_ws, reference_ws))


def _check_positive(name: str, value, *, required: bool) -> float | None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required with a threshold (JumpReLU): the width of the straight-through "
                             "estimator's rectangle, e.g. 0.001 as SAELens")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def relu_autoencode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, *, threshold: torch.Tensor | None = None, bandwidth: float | None = None,
                    p: float = 1.0, backend: str | None = None) -> ReLUAutoencodeOutput:
    """A ReLU (or, with ``threshold``, JumpReLU) SAE's reconstruction and code statistics.

    x: [..., d_in]; W_enc: [d_in, n_latents] (E2ESAE's latent-major storage, W_enc.T contiguous, is
    the fast layout; another is copied to it once per call on the Triton path); b_enc: [n_latents];
    W_dec: [n_latents, d_in] (already scaled for decoder_norm="forward"); b_dec: [d_in]; all one
    dtype. threshold: [n_latents] >= 0 (JumpReLU; pass exp(log_threshold) so that its gradient
    reaches log_threshold), bandwidth: the estimator's width (required with a threshold that
    requires grad; a fixed threshold may omit it). p > 0: the exponent of lp_sum.

    Returns ReLUAutoencodeOutput(reconstruction [..., d_in], lp_sum [...], l0 [...], fire_counts [n]).
    Differentiable with respect to x, W_enc, b_enc, W_dec, b_dec and threshold.
    """
    check_tensor("x", x, min_ndim=1, float_dtype=True)
    check_tensor("W_enc", W_enc, ndim=2, float_dtype=True)
    check_tensor("b_enc", b_enc, ndim=1, float_dtype=True)
    check_tensor("W_dec", W_dec, ndim=2, float_dtype=True)
    check_tensor("b_dec", b_dec, ndim=1, float_dtype=True)
    d_in, n_latents = W_enc.shape
    if n_latents == 0:
        raise ValueError("W_enc must have at least one latent (shape [d_in, n_latents]), got n_latents=0")
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in} (W_enc is {tuple(W_enc.shape)}), "
                         f"got shape {tuple(x.shape)}")
    check_shape("b_enc", b_enc, (n_latents,), "n_latents")
    check_shape("W_dec", W_dec, (n_latents, d_in), "[n_latents, d_in], the transpose of W_enc's shape")
    check_shape("b_dec", b_dec, (d_in,), "d_in")
    if threshold is not None:
        check_tensor("threshold", threshold, ndim=1, float_dtype=True)
        check_shape("threshold", threshold, (n_latents,), "n_latents")
        # The range check reads the tensor back: only on CPU (on CUDA it would stall the stream).
        if threshold.device.type == "cpu" and threshold.numel() and not bool((threshold >= 0).all()):
            raise ValueError("threshold must be >= 0 everywhere (pass exp(log_threshold)), got "
                             f"min {float(threshold.min())}")
    trained_threshold = threshold is not None and threshold.requires_grad
    bandwidth = _check_positive("bandwidth", bandwidth, required=trained_threshold)
    if threshold is not None and bandwidth is None:
        # A fixed threshold (BatchTopK's inference one) needs no estimator: bandwidth 0 makes the
        # band (|pre - theta| < bandwidth / 2) empty, so no entry is held for it.
        bandwidth = 0.0
    p = _check_positive("p", p, required=True)
    check_same("x", x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, d_in)
    tensors = [t for t in (x2d, W_enc, b_enc, W_dec, b_dec, threshold) if t is not None]
    if use_triton("relu_autoencode", *tensors, backend=backend) and x2d.shape[0] > 0:
        # The kernels read W_enc latent-major and W_dec row-major: other layouts are copied once.
        out = call_kernel("relu_autoencode", *encoder_operands(x2d, W_enc), b_enc.contiguous(), W_dec.contiguous(),
                          b_dec.contiguous(), None if threshold is None else threshold.contiguous(), bandwidth, p,
                          workspace_elements())
    else:
        out = ReLUAutoencodeReference.apply(x2d, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, p)
    reconstruction, lp_sum, l0, fire_counts = out
    return ReLUAutoencodeOutput(reconstruction.reshape(*leading, d_in), lp_sum.reshape(leading),
                                l0.reshape(leading), fire_counts)
