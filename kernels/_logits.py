"""Torch-only helpers of the fused linear-KL, shared by its kernel launcher and its PyTorch
reference (fastsae.ops.linear_kl). No triton import: the reference runs where Triton is absent."""

from __future__ import annotations

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
