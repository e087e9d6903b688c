"""Torch-only helpers of the fused linear-KL, shared by its kernel launcher and its PyTorch
reference (fastsae.ops.linear_kl). No triton import: the reference runs where Triton is absent."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# Where b_U is -inf (a vocabulary entry masked out), the online log-sum-exp of a tile whose
# logits are all -inf would compute exp(-inf - -inf) = NaN. A finite floor gives the same
# softmax: exp(-1e30 - m) is exactly 0 in fp32, and a capped logit c * tanh(-1e30 / c) = -c as
# with -inf.
BIAS_FLOOR = -1e30


def prepared_bias(b_U: torch.Tensor | None, softcap: float | None) -> torch.Tensor | None:
    """b_U as the KL reads it: at least fp32, contiguous, -inf raised to BIAS_FLOOR, and without a
    cap shifted by its maximum. Softmax, KL, CE and argmax are unchanged by a common shift, and the
    shifted bias keeps the logits near 0, where the precision resolves small differences (a +1e4
    common bias would otherwise round every logit to 1e-3); the shift is exact for entries within
    a factor 2 of the maximum. With a cap a shift would change the result, so none is applied.
    NaN entries stay NaN (and show in the loss)."""
    if b_U is None or b_U.numel() == 0:
        return b_U
    b = b_U.to(torch.promote_types(b_U.dtype, torch.float32)).contiguous().clamp_min(BIAS_FLOOR)
    if softcap is None:
        top = b.max()
        b = b - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return b


# ----------------------------------------------------------------------------------------------
# The KL without cancellation (shared by the kernel's slice merge and the PyTorch reference)
#
# Per token, with p = softmax(A), q = softmax(B), D = B - A and any centre c (a float per token):
#
#     x = D - c,  u = E_p[expm1(x)],  KL = E_p[phi(x)] + psi(u),
#     phi(x) = expm1(x) - x >= 0,  psi(u) = log1p(u) - u <= 0,
#
# since E_p[phi(x)] = u - E_p[x] and log1p(u) = log E_p[exp(D)] - c = lse(B) - lse(A) - c. Both
# phi and psi are evaluated by series where their argument is small, so a KL of 1e-5 keeps its
# relative precision (log s_B - log s_A loses it). The centre is c = max(B) - max(A), a typical
# value of D (between the D of the two argmaxes), so x stays small where the KL is small, and
# exp(A - max A + x) = exp(B - max B) <= 1 never overflows however large D is. Where |u| > 1/4
# (a large KL) psi is not small and the plain form log1p(u) - E_p[x] is used instead.
#
# The sums are accumulated relative to the running maximum m_A of A ("scaled sums": S = sum of
# exp(A - m_A), U = sum of exp(A - m_A) expm1(x), R = sum of exp(A - m_A) phi(x), T = sum of
# exp(A - m_A) x). Moving to a new maximum m_A' and centre c' (k = c - c') rescales them exactly:
#
#     S' = a S,   U' = b U + (b - a) S,   R' = a R + (b - a) U + a phi(k) S,   T' = a (T + k S),
#     a = exp(m_A - m_A'),  b = a exp(k),
#
# from expm1(x + k) = e^k expm1(x) + expm1(k) and phi(x + k) = phi(x) + expm1(k) expm1(x) + phi(k).
# b - a and a phi(k) are formed as a expm1(k) and a phi(k) for small k (no cancellation).
# ----------------------------------------------------------------------------------------------

# Below this |x|, phi(x) = expm1(x) - x is summed as a series (the kernel uses the same bound).
PHI_SERIES_BOUND = 0.125
# Below this |u|, KL = E_p[phi] + psi(u); above it, KL = log1p(u) - E_p[x].
PSI_SERIES_BOUND = 0.25


def phi_series(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = expm1(x) - x = x^2/2! + x^3/3! + ... for |x| <= PHI_SERIES_BOUND, to the precision
    of x's dtype: terms to x^6 in fp32 (the next is below 1.2e-8 of the sum), to x^13 in fp64.
    Fused multiply-adds in place (no temporaries beyond the result)."""
    last = 13 if x.dtype == torch.float64 else 6
    acc = torch.full_like(x, 1.0 / math.factorial(last))
    for n in range(last - 1, 1, -1):
        torch.addcmul(acc.new_tensor(1.0 / math.factorial(n)), acc, x, out=acc)
    return acc.mul_(x).mul_(x)


def expm1_phi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expm1(x), phi(x) = expm1(x) - x), both to x's relative precision for finite x <= 80."""
    small = x.abs() <= PHI_SERIES_BOUND
    phi_small = phi_series(torch.where(small, x, 0.0))
    em = torch.expm1(x)
    return torch.where(small, x + phi_small, em), torch.where(small, phi_small, em.sub_(x))


def centered_terms(log_p: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e, e * expm1(x), e * phi(x)) with e = exp(log_p), log_p = A - m_A <= 0, x = D - c, as the
    kernel forms them: the series where |x| < PHI_SERIES_BOUND; elsewhere e * expm1(x) =
    exp(log_p + x) - e, which cannot overflow (log_p + x = B - max(B) <= 0 up to rounding), and
    e * phi(x) = that - e x, within 4 eps / x^2 of phi (1.5e-5 at the bound, less beyond).
    -inf log_p gives three zeros. The branches are blended with a 0/1 float mask (exact: 1 * a +
    0 * b = a for finite b), not torch.where: on the CPU build bool-mask ops cost 5 to 10 times a
    multiply, and this runs on every logit of the reference."""
    e = torch.exp(log_p)
    xs = x.clamp(-PHI_SERIES_BOUND, PHI_SERIES_BOUND)  # finite series terms everywhere
    phi = phi_series(xs)
    small = (PHI_SERIES_BOUND - x.abs()).sign_().clamp_(min=0)  # 1 where |x| < bound, else 0
    e_small = e * small
    small.neg_().add_(1)  # now 1 where |x| >= bound
    e_em = torch.exp(log_p + x).sub_(e)  # the exp form; the series form blended in below
    e_phi = torch.addcmul(e_em, e, x, value=-1).mul_(small).addcmul_(phi, e_small)
    e_em.mul_(small).addcmul_(xs.add_(phi), e_small)  # xs + phi: the series' expm1
    return e, e_em, e_phi


def rescale_factors(log_alpha: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, b - a, a phi(k)) for a = exp(log_alpha), log_alpha = m_A - m_A' <= 0, and
    b = a exp(k), without cancellation (series where |k| is small); log_alpha = -inf (nothing
    accumulated yet) gives four zeros for any finite k. b = exp(log_alpha + k) cannot overflow:
    it is exp(max B - max B') up to rounding."""
    a, b = torch.exp(log_alpha), torch.exp(log_alpha + k)
    em, phi = expm1_phi(torch.clamp(k, max=80.0))  # exact wherever k <= 80
    large = k > 80.0
    b_minus_a = torch.where(large, b - a, a * em)
    return a, b, b_minus_a, torch.where(large, b_minus_a - a * k, a * phi)


def log1p_minus_identity(u: torch.Tensor) -> torch.Tensor:
    """psi(u) = log1p(u) - u in float64, by its series -u^2/2 + u^3/3 - ... where |u| <= 1/4."""
    u = u.double()
    small = u.abs() <= PSI_SERIES_BOUND
    us = torch.where(small, u, torch.zeros_like(u))
    acc = torch.zeros_like(us)
    for n in range(30, 1, -1):  # 0.25^29 / 30 < 1e-18 of the leading term
        acc = acc * us + (1.0 if n % 2 else -1.0) / n
    return torch.where(small, acc * us * us, torch.log1p(u) - u)


def kl_from_sums(s: torch.Tensor, u_sum: torch.Tensor, r_sum: torch.Tensor, t_sum: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL, log1p(u)) per token from the scaled sums S, U, R, T (comment block above): KL =
    R / S + psi(u) where |u| <= 1/4, log1p(u) - T / S elsewhere; lse(B) - lse(A) = c + log1p(u)."""
    u = u_sum / s
    log1p_u = torch.log1p(u)
    small = u.abs() <= PSI_SERIES_BOUND
    kl = torch.where(small, (r_sum / s).double() + log1p_minus_identity(u), (log1p_u - t_sum / s).double())
    # KL >= 0; rounding leaves -1e-16 where both distributions are one token (NaN stays NaN).
    return kl.clamp_min(0.0).to(s.dtype), log1p_u


class KLSums(NamedTuple):
    """The per-call sums both paths of the fused linear-KL (the Triton op and the PyTorch
    reference) return beside the loss, over the counted tokens. They travel as one fp32 [5]
    tensor (an autograd output must be a tensor) in this field order: writers build it with
    KLSums(...).stacked(), readers name it with KLSums(*sums)."""

    ce_orig: torch.Tensor  # the clean run's cross-entropy, summed over the labelled tokens
    ce_sae: torch.Tensor  # the SAE run's, the same way
    n_labelled: torch.Tensor  # tokens with a label (not ignore_index)
    n_agree: torch.Tensor  # tokens whose top-1 prediction agrees between the runs
    n_counted: torch.Tensor  # tokens counted (the mask's sum)

    def stacked(self) -> torch.Tensor:
        """The fp32 [5] tensor, in field order."""
        return torch.stack([value.to(torch.float32) for value in self])

    @classmethod
    def zeros(cls, device) -> torch.Tensor:
        """The stacked sums of no tokens."""
        return torch.zeros(len(cls._fields), dtype=torch.float32, device=device)
