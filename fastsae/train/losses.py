"""The loss terms of SAE training, each as in the paper's code (Braun et al. 2024) unless noted.

    sparsity      the kind's term (fastsae.activations: its training pass returns it as a LossTerm):
                  the paper's Lp norm of the code over latents, mean over tokens, divided by d_in;
                  JumpReLU's straight-through L0 / d_in.
    local MSE     the SAE's output vs its input, mean over all elements ("in_to_orig" for local SAEs).
    KL            KL(p_orig || p_sae) of the next-token distributions, mean over tokens, from the two
                  final hidden states through fastsae.ops.fused_linear_kl (no N x V logits).
    downstream    MSE of the spliced run's activations at later hooks vs the clean run's, mean over
                  elements per hook, times that hook's coefficient (e2e+ds).
    AuxK          (the selection kinds; OpenAI / EleutherAI sparsify) the top-k_aux dead latents
                  reconstruct the residual error x - x_hat; normalised by the error's variance.
                  It lives with the kinds that add it (fastsae.activations.auxk); re-exported here.

The trainer multiplies each term by its coefficient and sums; these functions return the bare term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsae import ops
from fastsae.activations.auxk import auxk_loss

__all__ = ["auxk_loss", "downstream_loss", "explained_variance", "explained_variance_ln",
           "explained_variance_out_to_in", "kl_loss", "mse_loss", "next_token_labels"]


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all elements, in fp32 whatever the inputs' dtype."""
    return F.mse_loss(output.float(), target.float())


def kl_loss(h_sae: torch.Tensor, h_orig: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor | None,
            labels: torch.Tensor | None = None, ignore_index: int = -100, softcap: float | None = None):
    """(KL(p_orig || p_sae) mean over tokens, LinearKLStats). Differentiable in h_sae only.

    softcap: the model's final-logit soft-capping (LanguageModel.logit_softcap; Gemma-2: 30),
    applied to both runs' logits in the KL and the CE; None for models without it."""
    return ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, labels=labels, ignore_index=ignore_index,
                               softcap=softcap, reduction="mean", return_stats=True)


def next_token_labels(tokens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels[:, t] = tokens[:, t + 1]; the last position has no next token (ignore_index)."""
    labels = torch.full_like(tokens, ignore_index)
    labels[:, :-1] = tokens[:, 1:]
    return labels


def downstream_loss(captured: dict[str, torch.Tensor], clean: dict[str, torch.Tensor],
                    weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum over hooks of weight * MSE(spliced acts, clean acts); also the per-hook MSEs (detached)."""
    total = None
    per_hook = {}
    for hook, weight in weights.items():
        mse = mse_loss(captured[hook], clean[hook])
        per_hook[hook] = mse.detach()
        total = weight * mse if total is None else total + weight * mse
    return total, per_hook


def explained_variance(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """The paper code's explained variance (e2e_sae.losses.calc_explained_variance, then .mean()):

        mean over tokens t of  1 - ||x_t - x_hat_t||^2 / ||x_t - mean_s(x_s)||^2

    a per-token ratio, averaged over the batch's tokens, with the mean taken over the batch's
    tokens. x is the target (the clean activations), reconstruction the prediction.
    """
    x2 = x.detach().float().reshape(-1, x.shape[-1])
    r2 = reconstruction.detach().float().reshape(-1, x.shape[-1])
    per_token_total = (x2 - x2.mean(0)).pow(2).sum(-1).clamp_min(1e-12)
    return (1 - (x2 - r2).pow(2).sum(-1) / per_token_total).mean()


def _layer_norm_pre(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer norm without its affine part (e2e_sae.losses._layer_norm_pre): centre each token's
    vector, divide by sqrt(mean of squares + eps)."""
    x = x - x.mean(dim=-1, keepdim=True)
    return x / (x.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()


def explained_variance_ln(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """explained_variance (x the target) after layer-norming both x and the reconstruction per
    token (no affine part, eps 1e-5): e2e_sae's ``calc_explained_variance(..., layer_norm=True)``,
    logged there as ``explained_variance_ln``. It ignores each token's scale and mean, so it
    measures direction only (what the next block's LayerNorm sees)."""
    x2 = _layer_norm_pre(x.detach().float().reshape(-1, x.shape[-1]))
    r2 = _layer_norm_pre(reconstruction.detach().float().reshape(-1, x.shape[-1]))
    return explained_variance(x2, r2)


def explained_variance_out_to_in(x: torch.Tensor, reconstruction: torch.Tensor, layer_norm: bool = False) -> torch.Tensor:
    """The local explained variance as the paper's code logs it (e2e_sae OutToInLoss:
    ``calc_explained_variance(input, output)``, key ``out_to_in/explained_variance``): the same
    per-token formula with the SAE's *output* as the target,

        mean over tokens t of  1 - ||x_t - x_hat_t||^2 / ||x_hat_t - mean_s(x_hat_s)||^2

    so the denominator is the reconstruction's spread, not the input's. It differs from
    explained_variance (the input as target, the usual definition) whenever the SAE shrinks or
    inflates its output; compare it only with the published runs' out_to_in numbers.
    layer_norm=True: both layer-normed first (``out_to_in/explained_variance_ln``)."""
    if layer_norm:
        return explained_variance_ln(reconstruction, x)
    return explained_variance(reconstruction, x)
