"""fused_linear_kl: KL(p_orig || p_sae) over the vocabulary from two hidden states and W_U.

p_orig = softmax(h_orig @ W_U + b_U) is the frozen model's output distribution, p_sae the same
with the SAE spliced in. This is the e2e SAE loss (Braun et al. 2024; the paper's code computes
kl_div(log p_sae, log p_orig, log_target=True, reduction="batchmean")).

The reference walks the tokens in chunks, each on a single-threaded worker (fastsae/ops/_workers.py:
a descheduled thread delays only its own chunk, never an OpenMP barrier of every op), each worker
with two [chunk, d_vocab] buffers allocated once and reused (chunk = CHUNK_ELEMENTS //
(2 * d_vocab), shorter with more than four workers); the matmuls run on the whole chunk, the
elementwise math (about a dozen ops, _fast_terms) on cache-sized slices. For a scalar reduction it
computes the gradient with respect to h_sae in the forward pass, (p_sae - p_orig) @ W_U^T times the
token's weight, and backward only scales it (Liger-Kernel's trick): one matmul fewer than
recomputing. For reduction="none" the gradient depends on a per-token grad_output, so backward
recomputes the logits chunk by chunk. All math is fp32 for fp32/fp16/bf16 inputs (fp64 inputs stay
fp64, so gradcheck can test the spec). There is no gradient for h_orig, W_U or b_U: the model is
frozen. The module is longer than most: the op, its dispatch and its reference (the spec, with
the terms it shares with the kernel) belong together.

Numerics, shared with the kernel: the SAE run's logits are the clean logits plus
(h_sae - h_orig) @ W_U, so the small difference that the KL measures is its own product and keeps
its precision; without a cap b_U is shifted by its maximum (an exact, result-preserving shift),
so a large common logit bias does not round the logits. Final-logit soft-capping
(softcap=c: cap(z) = c * tanh(z / c), as Gemma-2) is applied to both runs' full logits; the capped
difference is computed without cancellation (capped_logits), and the gradient carries the cap's
slope sech^2(z / c) at the SAE run's logits. The KL itself is formed without cancellation,
E_p[phi(x)] + psi(u) around a centre c (kernels/_logits.py): the reference takes c = D at the clean
argmax and phi(x) = expm1(x) - x from torch's expm1 (an exact subtraction where |x| < 1), and the
kernel's series form only for the rare rows where x is large; at KL = 3e-5 nats per token it keeps
its relative precision (tests/test_linear_kl.py's small-KL cases: at most 5e-6 per token, 2.3e-5
with a +5 common logit change; the difference of two log-sum-exps, the paper's form, is 5e-2 to
1.0 off), and the gradient q - p = p (expm1(x) - u) / (1 + u) is exact where q ~ p.

Dispatch: backend="triton" (or FASTSAE_BACKEND) forces the kernel, "torch" the reference. Under
"auto" CUDA tensors take the fused kernel (for a scalar reduction with a gradient, the one-sweep
kernel) unless benchmarks/gpu_check.py recorded another variant faster for this GPU and shape
class (fastsae/ops/_backend.py: measured dispatch; shape_class here): the fused two-pass kernel or
this reference. No record for the device: the fused kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastsae.ops._backend import (call_kernel, device_name, measured_fastest, missing_triton, requested_backend,
                                  use_triton)
from fastsae.ops import _workers, checks
from fastsae.ops.checks import check_same, check_shape, check_tensor
from fastsae.kernels._logits import KLSums, centered_terms, kl_from_sums, prepared_bias

try:  # the Triton kernels: triton is optional, without it the reference runs everywhere
    from fastsae.kernels import linear_kl as kernels
except ImportError as error:
    kernels = missing_triton(error)

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


def _workspace_rows(n_tokens: int, d_vocab: int, workers: int = 1) -> int:
    """Tokens per chunk. Each worker holds two [rows, d_vocab] logits buffers of CHUNK_ELEMENTS in
    all, and all workers together at most four times that (more workers, shorter chunks).

    At d_vocab = 50,257 that is 166 rows, 2 x 32 MiB of fp32 per worker: tall enough for efficient
    matmuls (each worker streams W_U once per chunk: at 83 rows the GPT-2 shape ran 10 % slower on
    the 2-core CPU), small enough that the whole forward + backward stays under 2 % of the naive
    form's peak memory at N = 8,192. Read at call time so tests can shrink it.
    """
    per_worker = checks.CHUNK_ELEMENTS // (2 * max(1, d_vocab))
    shared = 4 * checks.CHUNK_ELEMENTS // (2 * max(1, d_vocab) * max(1, workers))
    return max(1, min(n_tokens, per_worker, shared))


# Elements per elementwise step: its [rows, d_vocab] temporaries stay cache-sized (1 MiB in fp32;
# measured: 3.9 to 4.7 ns per logit on one thread from 256 Ki to 2 Mi elements a step).
_ELEMENTWISE_ELEMENTS = 1 << 18
# Where x = D - c exceeds this, the fast terms could lose precision (e = exp(A - max A) below
# exp(-64) is near fp32's denormals while e * expm1(x) is not small) or overflow (expm1 past 88):
# those rows take the stable terms. A logit change of 64 nats is a broken SAE, not a good one.
_FAST_X_BOUND = 64.0


def capped_logits(a: torch.Tensor, d: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cap(a), cap(a + d) - cap(a)) for cap(z) = c * tanh(z / c). The difference is computed as
    c * tanh(d/c) sech^2(a/c) / (1 + tanh(a/c) tanh(d/c)) where |d| < c / 2, so a small d (the
    SAE's effect) keeps its relative precision; as c * tanh((a + d) / c) - cap(a) elsewhere."""
    t_a, t_d = torch.tanh(a / softcap), torch.tanh(d / softcap)
    sech2_a = torch.cosh(a / softcap).square().reciprocal()  # cosh overflows to inf: sech^2 = 0
    diff = torch.where(d.abs() < 0.5 * softcap, softcap * t_d * sech2_a / (1 + t_a * t_d),
                       softcap * (torch.tanh((a + d) / softcap) - t_a))
    return softcap * t_a, diff


def _cap_in_place(a: torch.Tensor, d: torch.Tensor, softcap: float, slope: torch.Tensor | None) -> None:
    """Apply the soft cap to the clean logits a and the difference d in place; slope (if given)
    receives d cap / dz at the SAE run's logits, sech^2((a + d) / c), which the gradient carries."""
    if slope is not None:
        torch.add(a, d, out=slope).div_(softcap).cosh_().square_().reciprocal_()
    capped, capped_diff = capped_logits(a, d, softcap)
    a.copy_(capped)
    d.copy_(capped_diff)


class _RowTerms(NamedTuple):
    """Per-row results of one slice. The sums are relative to the clean run's maximum m_a and a
    centre c: S = sum e, U = sum e expm1(x), R = sum e phi(x), T = sum e x, with e = exp(A - m_a),
    x = D - c (kernels/_logits.py's comment block); KL, both log-sum-exps and the gradient follow
    from them. agree: whether the two runs' argmaxes agree."""

    m_a: torch.Tensor
    centre: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    agree: torch.Tensor


def _fast_terms(a: torch.Tensor, d: torch.Tensor, work: torch.Tensor, work2: torch.Tensor, want_grad: bool,
                ) -> tuple[_RowTerms, torch.Tensor]:
    """The sums in a dozen large ops (each a pass over the slice; on one thread, 4 to 5 ns per
    logit in all). The centre is D at the clean run's argmax, so x = 0 there and x is small
    wherever the SAE changes the logits a little; phi(x) = expm1(x) - x is an exact subtraction
    for |x| < 1 (Sterbenz) of torch's accurate expm1, so each term carries the rounding of expm1
    alone: an error about eps E_p|x| on a KL of order E_p[x^2] (relative error at most 2.3e-5 on
    the small-KL tests, 3e-5 nats per token), no series needed. The argmaxes agree when no logit
    of the SAE run exceeds its logit at the clean argmax, max e (1 + expm1(x)) = max exp(B -
    B[argmax A]) <= 1 (up to rounding; a tie counts as agreeing).

    a and d are overwritten (a with e; d with the gradient's terms e (expm1(x) - U / S) when
    want_grad). Returns the terms and the rows that need the stable form (x above _FAST_X_BOUND,
    or not finite)."""
    m_a, top_a = a.max(-1)
    centre = d.gather(1, top_a[:, None])
    x = d.sub_(centre)
    needs_stable = ~(x.amax(-1) <= _FAST_X_BOUND)  # NaN counts as needing it
    e = a.sub_(m_a[:, None]).exp_()
    s = e.sum(-1)
    em = torch.expm1(x, out=work)
    t = torch.mul(e, x, out=work2).sum(-1)
    u = torch.mul(e, em, out=work2).sum(-1)  # work2 holds e expm1(x)
    r = torch.sub(em, x, out=work).mul_(e).sum(-1)
    agree = torch.add(work2, e, out=work).amax(-1) <= 1
    if want_grad:  # e (expm1(x) - U / S) = S (q - p) (1 + U / S): scaled per row after the matmul
        torch.addcmul(work2, e, (u / s)[:, None], value=-1, out=d)
    return _RowTerms(m_a, centre.squeeze(1), s, u, r, t, agree), needs_stable


def _stable_terms(a: torch.Tensor, d: torch.Tensor, want_grad: bool) -> _RowTerms:
    """The sums for any finite logits, as the kernel forms them (kernels/_logits.py: centre
    max(B) - max(A), so that exp(A - max A + x) = exp(B - max B) cannot overflow, and phi by its
    series where x is small). About 30 ops; run only on the rows the fast terms cannot take.
    a and d are overwritten (d with the gradient's terms when want_grad)."""
    m_a, top_a = a.max(-1)
    b = a + d
    m_b = b.max(-1).values
    agree = b.gather(1, top_a[:, None]).squeeze(1) >= m_b  # as the fast form: a tie agrees
    del b
    centre = m_b - m_a
    x = d.sub_(centre[:, None])
    e, e_em, e_phi = centered_terms(a.sub_(m_a[:, None]), x)
    s, u = e.sum(-1), e_em.sum(-1)
    terms = _RowTerms(m_a, centre, s, u, e_phi.sum(-1), torch.linalg.vecdot(e, x), agree)
    if want_grad:
        torch.addcmul(e_em, e, (u / s)[:, None], value=-1, out=d)
    return terms


class _KLPass:
    """One pass over token chunks: per-token KL, the gradient with respect to h_sae (want_grad),
    and the stats sums, each chunk on a worker (fastsae/ops/_workers.py).

    W, b are already in the compute dtype (b already shifted where there is no cap). token_weight
    [N] scales each token's gradient (and decides which tokens count for the stats: weight > 0).
    The SAE run's logits are the clean ones plus (h_sae - h_orig) @ W: the small difference is its
    own product, so it keeps its precision. The KL is formed without cancellation
    (kernels/_logits.py): KL = R / S + psi(U / S), from per-row sums (_fast_terms; _stable_terms
    for the rare rows the fast form cannot take, recomputed from their hidden states). Each
    worker's [rows, d_vocab] buffers are allocated once and reused for every chunk it takes, with
    in-place / out= ops (fresh multi-MiB allocations page-fault on every chunk); the matmuls run on
    the whole chunk, the elementwise math on cache-sized slices of it.
    """

    def __init__(self, h_sae, h_orig, W, b, token_weight, labels, ignore_index, want_grad, softcap):
        self.h_sae, self.h_orig, self.W, self.b = h_sae, h_orig, W, b
        self.token_weight, self.labels, self.ignore_index = token_weight, labels, ignore_index
        self.want_grad, self.softcap = want_grad, softcap
        n_tokens, d_vocab = h_sae.shape[0], W.shape[1]
        dtype, device = W.dtype, h_sae.device
        self.kl = torch.empty(n_tokens, dtype=dtype, device=device)
        self.grad = torch.empty(h_sae.shape, dtype=dtype, device=device) if want_grad else None
        workers = _workers.worker_count(device)
        self.chunks = _workers.chunk_bounds(n_tokens, _workspace_rows(n_tokens, d_vocab, workers))
        self.rows = max((end - start for start, end in self.chunks), default=0)
        self.step = max(1, min(self.rows, _ELEMENTWISE_ELEMENTS // max(1, d_vocab)))
        self.device = device
        self.buffers = _workers.BufferPool(self._make_buffers)

    def run(self):
        """(kl [N], grad [N, d] or None, sums: KLSums stacked)."""
        chunk_sums = _workers.map_chunks(self._chunk, len(self.chunks), self.device)
        sums = torch.stack(chunk_sums).sum(0) if chunk_sums else KLSums.zeros(self.device)
        return self.kl, self.grad, sums

    def _make_buffers(self):
        """The [2 rows, d_vocab] logits buffer (the clean run's rows, then the differences), the
        slices' work buffers (and the cap's slope)."""
        like = dict(dtype=self.W.dtype, device=self.device)
        piece = (self.step, self.W.shape[1])
        slope = torch.empty(piece, **like) if self.want_grad and self.softcap else None
        return (torch.empty(2 * self.rows, self.W.shape[1], **like), torch.empty(piece, **like),
                torch.empty(piece, **like), slope)

    def _chunk(self, index: int) -> torch.Tensor:
        with self.buffers.borrow() as buffers:
            return self._chunk_with(*self.chunks[index], *buffers)

    def _chunk_with(self, start, end, logits_buf, work_buf, work2_buf, slope_buf) -> torch.Tensor:
        n, dtype = end - start, self.W.dtype
        # The clean run's logits and the difference (h_sae - h_orig) @ W of the SAE run's, in one
        # product (W streamed once for both); the bias is added per slice, in cache (cheaper than
        # addmm's pass over the chunk).
        h_clean = self.h_orig[start:end].to(dtype)
        h_diff = self.h_sae[start:end].to(dtype) - h_clean
        both = logits_buf[: 2 * n]
        torch.mm(torch.cat([h_clean, h_diff]), self.W, out=both)
        logits, delta = both[:n], both[n:]
        safe = None
        if self.labels is not None:
            has_label = (self.token_weight[start:end] > 0) & (self.labels[start:end] != self.ignore_index)
            safe = torch.where(has_label, self.labels[start:end], 0).unsqueeze(1)
            label_a = torch.empty(n, dtype=dtype, device=self.device)
            label_b = torch.empty_like(label_a)
        slices = []
        for s0 in range(0, n, self.step):
            s1 = min(s0 + self.step, n)
            a, d = logits[s0:s1], delta[s0:s1]
            if self.b is not None:
                a.add_(self.b)
            slope = None if slope_buf is None else slope_buf[: s1 - s0]
            if self.softcap:
                _cap_in_place(a, d, self.softcap, slope)
            if safe is not None:  # the label's logit in both runs, before a and d are overwritten
                label_a[s0:s1] = a.gather(1, safe[s0:s1]).squeeze(1)
                label_b[s0:s1] = label_a[s0:s1] + d.gather(1, safe[s0:s1]).squeeze(1)
            terms, needs_stable = _fast_terms(a, d, work_buf[: s1 - s0], work2_buf[: s1 - s0], self.want_grad)
            if slope is not None:
                d.mul_(slope)  # ... times the cap's slope
            if bool(needs_stable.any()):
                terms = self._with_stable_rows(terms, needs_stable.nonzero().squeeze(1), h_clean[s0:s1],
                                               h_diff[s0:s1], d)
            slices.append(terms)
        terms = _RowTerms(*(torch.cat(values) for values in zip(*slices)))
        kl_rows, log1p_u = kl_from_sums(terms.s, terms.u, terms.r, terms.t)
        self.kl[start:end] = kl_rows
        w = self.token_weight[start:end]
        counted = w > 0
        ce_orig = ce_sae = n_labelled = torch.zeros((), dtype=torch.float32, device=self.device)
        if safe is not None:  # cross-entropy = lse - the label's logit
            lse_a = terms.m_a + torch.log(terms.s)
            ce_orig = torch.where(has_label, lse_a - label_a, 0.0).sum()
            ce_sae = torch.where(has_label, (lse_a + terms.centre + log1p_u) - label_b, 0.0).sum()
            n_labelled = has_label.sum()
        sums = KLSums(ce_orig=ce_orig, ce_sae=ce_sae, n_labelled=n_labelled, n_agree=(terms.agree & counted).sum(),
                      n_counted=counted.sum()).stacked()
        if self.want_grad:
            # Chain through the unembedding, then scale and weight the token. torch.where, not a
            # product, so a masked token with non-finite inputs gives 0.
            grad = self.grad[start:end]
            torch.mm(delta, self.W.t(), out=grad)
            row_scale = w / (terms.s + terms.u)
            grad.copy_(torch.where((w != 0).unsqueeze(1), grad * row_scale.unsqueeze(1), 0.0))
        return sums

    def _with_stable_rows(self, terms: _RowTerms, rows: torch.Tensor, h_clean, h_diff, d) -> _RowTerms:
        """terms with the given rows of a slice replaced by the stable form's, recomputed from
        their hidden states (the fast form overwrote the slice's logits); so are those rows'
        gradient terms in d (with the cap's slope)."""
        a_rows = torch.empty(len(rows), self.W.shape[1], dtype=self.W.dtype, device=self.device)
        d_rows = torch.empty_like(a_rows)
        _logits_into(a_rows, d_rows, h_clean[rows], h_diff[rows], self.W, self.b)
        slope_rows = torch.empty_like(a_rows) if self.want_grad and self.softcap else None
        if self.softcap:
            _cap_in_place(a_rows, d_rows, self.softcap, slope_rows)
        stable = _stable_terms(a_rows, d_rows, self.want_grad)
        if self.want_grad:
            d[rows] = d_rows if slope_rows is None else d_rows * slope_rows
        return _RowTerms(*(fast.clone().index_copy_(0, rows, fixed) for fast, fixed in zip(terms, stable)))


def _logits_into(logits, delta, h_clean, h_diff, W, b) -> None:
    """logits = h_clean @ W + b and delta = h_diff @ W, into the given buffers."""
    if b is None:
        torch.mm(h_clean, W, out=logits)
    else:
        torch.addmm(b, h_clean, W, out=logits)
    torch.mm(h_diff, W, out=delta)


def _kl_chunks(h_sae, h_orig, W, b, token_weight, labels, ignore_index, want_grad, softcap=None):
    """(kl, grad, sums) of one pass over the tokens (_KLPass)."""
    return _KLPass(h_sae, h_orig, W, b, token_weight, labels, ignore_index, want_grad, softcap).run()


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
    if use_triton("fused_linear_kl", kernels, h_sae2d, h_orig2d, W_U, backend=backend):
        variant = _kernel_variant(h_sae2d, W_U, reduction, backend)
    if variant != "reference":
        # Same contract as the reference: (loss, sums), differentiable in h_sae only.
        loss, sums = call_kernel(kernels.linear_kl_triton, h_sae2d, h_orig2d, W_U, b_U, mask, labels, reduction,
                                 ignore_index, softcap, variant != "two_pass")
    else:
        loss, sums = LinearKLReference.apply(h_sae2d, h_orig2d, W_U, b_U, mask, labels, reduction, ignore_index,
                                             softcap)
    if reduction == "none":
        loss = loss.reshape(leading)
    if not return_stats:
        return loss
    sums = KLSums(*sums)
    have_labels = labels is not None
    return loss, LinearKLStats(
        ce_orig=sums.ce_orig / sums.n_labelled.clamp_min(1) if have_labels else None,
        ce_sae=sums.ce_sae / sums.n_labelled.clamp_min(1) if have_labels else None,
        top1_agreement=sums.n_agree / sums.n_counted.clamp_min(1),
        n_tokens=sums.n_counted,
    )
