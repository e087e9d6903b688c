"""fused_linear_kl: KL(p_orig || p_sae) over the vocabulary from two hidden states and W_U.

p_orig = softmax(h_orig @ W_U + b_U) is the frozen model's output distribution, p_sae the same
with the SAE spliced in. This is the e2e SAE loss (Braun et al. 2024; the paper's code computes
kl_div(log p_sae, log p_orig, log_target=True, reduction="batchmean")).

The reference walks the tokens in chunks so that at most two [chunk, d_vocab] buffers exist
(chunk = CHUNK_ELEMENTS // (2 * d_vocab)), allocated once and reused by every chunk. For a
scalar reduction it computes the gradient with respect to h_sae in the forward pass,
(p_sae - p_orig) @ W_U^T times the token's weight, and backward only scales it (Liger-Kernel's
trick): one matmul fewer than recomputing. For reduction="none" the gradient depends on a
per-token grad_output, so backward recomputes the logits chunk by chunk. All math is fp32 for
fp32/fp16/bf16 inputs (fp64 inputs stay fp64, so gradcheck can test the spec). There is no
gradient for h_orig, W_U or b_U: the model is frozen.

Numerics, shared with the kernel: the SAE run's logits are the clean logits plus
(h_sae - h_orig) @ W_U, so the small difference that the KL measures is its own product and keeps
its precision; without a cap b_U is shifted by its maximum (an exact, result-preserving shift),
so a large common logit bias does not round the logits. Final-logit soft-capping
(softcap=c: cap(z) = c * tanh(z / c), as Gemma-2) is applied to both runs' full logits; the capped
difference is computed without cancellation (capped_logits), and the gradient carries the cap's
slope sech^2(z / c) at the SAE run's logits. The KL itself is formed without cancellation,
E_p[phi(x)] + psi(u) around the centre max(B) - max(A) (kernels/_logits.py): at KL = 5e-5 nats
per token it keeps fp32's relative precision (1e-6 measured; the difference of two log-sum-exps,
the paper's form, is 3.6e-2 off), and the gradient q - p = p (expm1(x) - u) / (1 + u) is exact
where q ~ p.

Dispatch: backend="triton" (or FASTSAE_BACKEND) forces the kernel, "torch" the reference. Under
"auto" CUDA tensors take the fused kernel (for a scalar reduction with a gradient, the one-sweep
kernel) unless benchmarks/gpu_check.py recorded another variant faster for this GPU and shape
class (fastsae/ops/_backend.py: measured dispatch; shape_class here): the fused two-pass kernel or
this reference. No record for the device: the fused kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastsae.ops._backend import call_kernel, device_name, measured_fastest, register_kernel, requested_backend, use_triton
from fastsae.ops import _checks
from fastsae.ops._checks import check_same, check_shape, check_tensor
from fastsae.kernels._logits import centered_terms, kl_from_sums, prepared_bias

register_kernel("fused_linear_kl", "linear_kl", "linear_kl_triton")

REDUCTIONS = ("mean", "sum", "none")
# The variants benchmarks/gpu_check.py times (the measured dispatch, fastsae/ops/_backend.py):
# "one_sweep" (loss and gradient in one sweep over W_U, 8*N*d*V), "two_pass" (forward, then the
# gradient's own sweep in backward, 4 + 6*N*d*V), "forward" (loss only, 4*N*d*V), "reference".
VARIANTS_WITH_GRAD = ("one_sweep", "two_pass", "reference")
VARIANTS_LOSS_ONLY = ("forward", "reference")


def shape_class(dtype: torch.dtype, d_model: int, d_vocab: int, with_grad: bool) -> str:
    """The measured dispatch's key for a call: the operand dtype (fp32 with torch's matmul
    precision, which picks TF32 / bf16 / fp32 tensor-core modes), d, V, and whether a gradient
    is computed ("fwd_bwd") or not ("fwd"). The token count is matched separately."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    name = name or f"fp32-{torch.get_float32_matmul_precision()}"
    return f"{name}/d{d_model}/V{d_vocab}/{'fwd_bwd' if with_grad else 'fwd'}"


def _kernel_variant(h_sae: torch.Tensor, W_U: torch.Tensor, reduction: str, backend: str | None) -> str:
    """Under backend "auto" on a GPU, the variant recorded fastest for this device and shape class
    ("reference" among them); without a record, or with a forced backend, the fused kernel."""
    with_grad = torch.is_grad_enabled() and h_sae.requires_grad
    default = "one_sweep" if with_grad and reduction != "none" else "two_pass" if with_grad else "forward"
    if requested_backend(backend) != "auto":
        return default
    if not with_grad:
        variants = VARIANTS_LOSS_ONLY
    else:  # reduction="none" has no one-sweep form: its gradient needs the per-token grad_output
        variants = VARIANTS_WITH_GRAD if reduction != "none" else ("two_pass", "reference")
    fastest = measured_fastest("fused_linear_kl", device_name(h_sae),
                               shape_class(h_sae.dtype, W_U.shape[0], W_U.shape[1], with_grad), h_sae.shape[0],
                               variants)
    return fastest or default


class LinearKLStats(NamedTuple):
    """Per-call metrics computed in the same pass (detached, fp32 scalars).

    ce_orig / ce_sae: next-token cross-entropy of the clean and spliced runs over the tokens with a
    label (None when no labels were given); top1_agreement: the share of tokens whose argmax agrees;
    n_tokens: tokens counted (the mask's sum).
    """

    ce_orig: torch.Tensor | None
    ce_sae: torch.Tensor | None
    top1_agreement: torch.Tensor
    n_tokens: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _workspace_rows(n_tokens: int, d_vocab: int) -> int:
    """Tokens per chunk: the two [rows, d_vocab] logits buffers share CHUNK_ELEMENTS elements.

    At d_vocab = 50,257 that is 166 rows, 2 x 32 MiB of fp32: tall enough for efficient matmuls
    (measured on the 2-core CPU), small enough that the whole forward + backward stays under 2 %
    of the naive form's peak memory at N = 8,192. Read at call time so tests can shrink it.
    """
    return max(1, min(n_tokens, _checks.CHUNK_ELEMENTS // (2 * max(1, d_vocab))))


# Rows per elementwise step: its temporaries ([rows, d_vocab]) stay cache-sized (4 MiB in fp32).
_ELEMENTWISE_ELEMENTS = 1 << 20


def capped_logits(a: torch.Tensor, d: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cap(a), cap(a + d) - cap(a)) for cap(z) = c * tanh(z / c). The difference is computed as
    c * tanh(d/c) sech^2(a/c) / (1 + tanh(a/c) tanh(d/c)) where |d| < c / 2, so a small d (the
    SAE's effect) keeps its relative precision; as c * tanh((a + d) / c) - cap(a) elsewhere."""
    t_a, t_d = torch.tanh(a / softcap), torch.tanh(d / softcap)
    sech2_a = torch.cosh(a / softcap).square().reciprocal()  # cosh overflows to inf: sech^2 = 0
    diff = torch.where(d.abs() < 0.5 * softcap, softcap * t_d * sech2_a / (1 + t_a * t_d),
                       softcap * (torch.tanh((a + d) / softcap) - t_a))
    return softcap * t_a, diff


def _kl_chunks(h_sae, h_orig, W, b, token_weight, labels, ignore_index, want_grad, softcap=None):
    """One pass over token chunks: per-token KL, optional grad wrt h_sae, stats sums.

    W, b are already in the compute dtype (b already shifted where there is no cap). token_weight
    [N] scales each token's gradient (and decides which tokens count for the stats: weight > 0).
    The SAE run's logits are the clean ones plus (h_sae - h_orig) @ W: the small difference is its
    own product, so it keeps its precision. The KL is formed without cancellation, as the kernel
    does (kernels/_logits.py): centre c = max(B) - max(A), x = D - c, KL = E_p[phi(x)] + psi(u).
    The [rows, d_vocab] buffers are allocated once and reused by every chunk with in-place / out=
    ops: fresh multi-MiB allocations page-fault on every chunk, which costs as much as the
    elementwise math itself. The matmuls run on the whole chunk; the elementwise math on
    cache-sized slices of it.
    """
    n_tokens, d_vocab = h_sae.shape[0], W.shape[1]
    dtype, device = W.dtype, h_sae.device
    kl = torch.empty(n_tokens, dtype=dtype, device=device)
    grad = torch.empty(h_sae.shape, dtype=dtype, device=device) if want_grad else None
    # [ce_orig sum, ce_sae sum, labelled tokens, top-1 agreements, counted tokens]
    sums = torch.zeros(5, dtype=torch.float32, device=device)
    rows = _workspace_rows(n_tokens, d_vocab)
    step = max(1, min(rows, _ELEMENTWISE_ELEMENTS // max(1, d_vocab)))
    clean_buf = torch.empty(rows, d_vocab, dtype=dtype, device=device)
    delta_buf = torch.empty(rows, d_vocab, dtype=dtype, device=device)
    slope_buf = torch.empty(step, d_vocab, dtype=dtype, device=device) if want_grad and softcap else None
    for start in range(0, n_tokens, rows):
        end = min(start + rows, n_tokens)
        logits, delta = clean_buf[: end - start], delta_buf[: end - start]
        # The clean run's logits, and the difference (h_sae - h_orig) @ W of the SAE run's.
        h_clean = h_orig[start:end].to(dtype)
        if b is None:
            torch.mm(h_clean, W, out=logits)
        else:
            torch.addmm(b, h_clean, W, out=logits)
        torch.mm(h_sae[start:end].to(dtype) - h_clean, W, out=delta)
        w = token_weight[start:end]
        counted = w > 0
        lab = None
        if labels is not None:
            lab = labels[start:end]
            has_label = counted & (lab != ignore_index)
            safe = torch.where(has_label, lab, torch.zeros_like(lab)).unsqueeze(1)
            sums[2] += has_label.sum()
        for s0 in range(0, end - start, step):
            s1 = min(s0 + step, end - start)
            a, d = logits[s0:s1], delta[s0:s1]
            if softcap:
                if want_grad:  # d cap / dz at the SAE run's logits, before they are overwritten
                    torch.add(a, d, out=slope_buf[: s1 - s0]).div_(softcap).cosh_().square_().reciprocal_()
                capped, capped_diff = capped_logits(a, d, softcap)
                a.copy_(capped)
                d.copy_(capped_diff)
            # A = a (clean run), D = d (SAE run minus clean run); the maxima stabilise and centre.
            sae_logits = a + d  # for the argmax and the label only
            m_b, top_b = sae_logits.max(-1)
            m_a, top_a = a.max(-1)
            sums[3] += ((top_a == top_b) & counted[s0:s1]).sum()
            if lab is not None:  # cross-entropy = lse - the label's logit
                keep, idx = has_label[s0:s1], safe[s0:s1]
                label_a, label_b = a.gather(1, idx).squeeze(1), sae_logits.gather(1, idx).squeeze(1)
            del sae_logits
            centre = m_b - m_a
            x = d.sub_(centre[:, None])  # in place: D - c
            e, e_em, e_phi = centered_terms(a.sub_(m_a[:, None]), x)
            s_sum, u_sum = e.sum(-1), e_em.sum(-1)
            kl_rows, log1p_u = kl_from_sums(s_sum, u_sum, e_phi.sum(-1), torch.linalg.vecdot(e, x))
            del e_phi
            kl[start + s0:start + s1] = kl_rows
            if lab is not None:
                lse_a = m_a + torch.log(s_sum)
                sums[0] += torch.where(keep, lse_a - label_a, 0.0).sum()
                sums[1] += torch.where(keep, (lse_a + centre + log1p_u) - label_b, 0.0).sum()
            if want_grad:
                # d KL / d logits_sae = q - p = e (expm1(x) - u) / (S (1 + u)), into d (which the
                # matmul below reads): small where q ~ p, and exact there.
                u = (u_sum / s_sum)[:, None]
                torch.sub(e_em, e * u, out=d).div_((s_sum + u_sum)[:, None])
                if softcap:
                    d.mul_(slope_buf[: s1 - s0])  # ... times the cap's slope
        sums[4] += counted.sum()
        if want_grad:
            # Chain through the unembedding, then weight the token. torch.where, not a product,
            # so a masked token with non-finite inputs gives 0.
            torch.mm(delta, W.t(), out=grad[start:end])
            grad[start:end] = torch.where((w != 0).unsqueeze(1), grad[start:end] * w.unsqueeze(1), 0.0)
    return kl, grad, sums


class LinearKLReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_sae, h_orig, W_U, b_U, mask, labels, reduction, ignore_index, softcap):
        dtype = _compute_dtype(h_sae.dtype)
        W = W_U.to(dtype)  # a copy only when W_U is fp16/bf16
        b = prepared_bias(b_U, softcap)  # shifted when uncapped, -inf floored (kernels/_logits.py)
        b = None if b is None else b.to(dtype)
        maskf = torch.ones(h_sae.shape[0], dtype=dtype, device=h_sae.device) if mask is None else mask.to(dtype)
        n_counted = maskf.sum()
        if reduction == "mean":
            token_weight = maskf / n_counted.clamp_min(1.0)
        else:
            token_weight = maskf
        want_grad = ctx.needs_input_grad[0] and reduction != "none"
        kl, grad, sums = _kl_chunks(
            h_sae, h_orig, W, b, token_weight, labels, ignore_index, want_grad, softcap)
        kl = torch.where(maskf > 0, kl, 0.0)  # masked tokens count 0 (even if their KL is not finite)
        ctx.reduction = reduction
        ctx.h_dtype = h_sae.dtype
        ctx.softcap = softcap
        if reduction == "none":
            ctx.save_for_backward(h_sae, h_orig, W_U, b_U, maskf)
            loss = kl
        else:
            ctx.save_for_backward(grad)
            loss = (kl * token_weight).sum() if reduction == "mean" else kl.sum()
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        if ctx.reduction != "none":
            (grad,) = ctx.saved_tensors
            return (grad * grad_loss).to(ctx.h_dtype), None, None, None, None, None, None, None, None
        h_sae, h_orig, W_U, b_U, maskf = ctx.saved_tensors
        W = W_U.to(maskf.dtype)
        b = prepared_bias(b_U, ctx.softcap)
        b = None if b is None else b.to(maskf.dtype)
        _, grad, _ = _kl_chunks(h_sae, h_orig, W, b, maskf * grad_loss.to(maskf.dtype), None, -100, True,
                                ctx.softcap)
        return grad.to(ctx.h_dtype), None, None, None, None, None, None, None, None


def fused_linear_kl(h_sae: torch.Tensor, h_orig: torch.Tensor, W_U: torch.Tensor,
                    b_U: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, reduction: str = "mean",
                    ignore_index: int = -100, softcap: float | None = None,
                    return_stats: bool = False, backend: str | None = None):
    """KL(p_orig || p_sae) per token, p = softmax(cap(h @ W_U + b_U)), without an [N, d_vocab] tensor.

    h_sae, h_orig: [..., d_model], the final hidden states (after the last layer norm) of the run
    with the SAE and of the clean run. W_U: [d_model, d_vocab]; b_U: [d_vocab] or None.
    mask: bool [...], tokens to count (padding False). labels: int [...] next-token ids
    (ignore_index skipped), only for the stats. reduction: "mean" over counted tokens (default),
    "sum", or "none" (shape [...], 0 at masked tokens).
    softcap: final-logit soft-capping, cap(z) = softcap * tanh(z / softcap) (Gemma-2: 30; the
    model's LanguageModel.logit_softcap), applied to both runs' logits in the KL and the CE, with
    its gradient; None (default): no cap.
    Returns the loss, or (loss, LinearKLStats) with return_stats=True.
    Differentiable with respect to h_sae only.
    """
    check_tensor("h_sae", h_sae, min_ndim=1, float_dtype=True)
    check_tensor("h_orig", h_orig, min_ndim=1, float_dtype=True)
    check_tensor("W_U", W_U, ndim=2, float_dtype=True)
    d_model, d_vocab = W_U.shape
    if h_sae.shape[-1] != d_model:
        raise ValueError(f"h_sae must have last dimension d_model={d_model} (W_U is {tuple(W_U.shape)}), "
                         f"got shape {tuple(h_sae.shape)}")
    check_shape("h_orig", h_orig, tuple(h_sae.shape), "the shape of h_sae")
    if b_U is not None:
        check_tensor("b_U", b_U, ndim=1, float_dtype=True)
        check_shape("b_U", b_U, (d_vocab,), "d_vocab")
    check_same("h_sae", h_sae, h_orig=h_orig, W_U=W_U, b_U=b_U)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
            raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
        softcap = float(softcap)
    leading = h_sae.shape[:-1]
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        check_shape("mask", mask, tuple(leading), "the leading dimensions of h_sae")
        mask = mask.reshape(-1).to(h_sae.device)
    if labels is not None:
        check_tensor("labels", labels)
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
        check_shape("labels", labels, tuple(leading), "the leading dimensions of h_sae")
        labels = labels.reshape(-1).long().to(h_sae.device)
        # The range check reads the tensor back: only on CPU (on CUDA it would stall the stream).
        if labels.numel() and labels.device.type == "cpu":
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= d_vocab))
            if bool(bad.any()):
                raise ValueError(f"labels must lie in [0, d_vocab={d_vocab}) or equal ignore_index={ignore_index}, "
                                 f"got {int(labels[bad][0])}")
    h_sae2d, h_orig2d = h_sae.reshape(-1, d_model), h_orig.reshape(-1, d_model).detach()
    variant = "reference"
    if use_triton("fused_linear_kl", h_sae2d, h_orig2d, W_U, backend=backend):
        variant = _kernel_variant(h_sae2d, W_U, reduction, backend)
    if variant != "reference":
        # Same contract as the reference: (loss, sums), differentiable in h_sae only.
        loss, sums = call_kernel("fused_linear_kl", h_sae2d, h_orig2d, W_U, b_U, mask, labels, reduction,
                                 ignore_index, softcap, variant != "two_pass")
    else:
        loss, sums = LinearKLReference.apply(h_sae2d, h_orig2d, W_U, b_U, mask, labels, reduction, ignore_index,
                                             softcap)
    if reduction == "none":
        loss = loss.reshape(leading)
    if not return_stats:
        return loss
    ce_orig_sum, ce_sae_sum, n_labelled, n_agree, n_counted = sums.unbind()
    have_labels = labels is not None
    return loss, LinearKLStats(
        ce_orig=ce_orig_sum / n_labelled.clamp_min(1) if have_labels else None,
        ce_sae=ce_sae_sum / n_labelled.clamp_min(1) if have_labels else None,
        top1_agreement=n_agree / n_counted.clamp_min(1),
        n_tokens=n_counted,
    )
