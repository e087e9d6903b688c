"""The loss terms of SAE training, each as in the paper's code (Braun et al. 2024) unless noted.

    sparsity      the activation's term (fastsae.activations; E2ESAE.training_forward computes it):
                  the paper's Lp norm of the code over latents, mean over tokens, divided by d_in;
                  JumpReLU's straight-through L0 / d_in.
    local MSE     the SAE's output vs its input, mean over all elements ("in_to_orig" for local SAEs).
    KL            KL(p_orig || p_sae) of the next-token distributions, mean over tokens, from the two
                  final hidden states through fastsae.ops.fused_linear_kl (no N x V logits).
    downstream    MSE of the spliced run's activations at later hooks vs the clean run's, mean over
                  elements per hook, times that hook's coefficient (e2e+ds).
    AuxK          (TopK SAEs; OpenAI / EleutherAI sparsify) the top-k_aux dead latents reconstruct
                  the residual error x - x_hat; normalised by the error's variance.

The trainer multiplies each term by its coefficient and sums; these functions return the bare term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsae import ops
from fastsae.sae import E2ESAE


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


def auxk_loss(sae: E2ESAE, x: torch.Tensor, reconstruction: torch.Tensor, dead: torch.Tensor,
              k_aux: int | None = None) -> torch.Tensor:
    """AuxK: the k_aux largest pre-activations among the dead latents reconstruct e = x - x_hat.

    dead: bool [n_latents]. Only the dead latents' columns of W_enc are read (an [n_dead, d_in]
    gather of its latent-major rows), and topk_encode walks the tokens in chunks, so no [N, n_latents] tensor is built.
    The gradient reaches only the dead latents' encoder and decoder rows: x and the error are
    detached. Loss = ||e_hat - e||^2 / ||e - mean(e)||^2 (as sparsify), scaled by
    min(1, n_dead / k_aux) so that a few dead latents do not get the full weight.
    """
    d_in = sae.d_in
    k_aux = k_aux or d_in // 2
    dead_ids = dead.nonzero().squeeze(1)
    n_dead = dead_ids.numel()
    if n_dead == 0:
        return x.new_zeros((), dtype=torch.float32)
    x2 = x.detach().reshape(-1, d_in)
    error = (x2 - reconstruction.detach().reshape(-1, d_in)).float()
    k = min(k_aux, n_dead)
    # The kernels specialise on their int arguments (equal to 1, divisible by 16): with the dead
    # set padded to a multiple of 16 latents (phantoms with bias -inf, never above a real one)
    # and k rounded up to a multiple of 16 (the extra slots zeroed), an AuxK launch is one of the
    # TopK step's own compiled specialisations (tests/test_compile.py), however many latents died.
    width = -(-n_dead // 16) * 16
    k_launch = min(-(-k // 16) * 16, width)
    padded_ids = torch.cat([dead_ids, dead_ids[:1].expand(width - n_dead)])
    real = torch.arange(width, device=dead_ids.device) < n_dead
    # W_enc is stored latent-major (W_enc.T is contiguous): gather whole rows of it, and keep the
    # [d_in, width] view in that layout, which the encoder kernels read fastest.
    W_dead = sae.W_enc.T.index_select(0, padded_ids).T
    b_dead = torch.where(real, sae.b_enc[padded_ids], float("-inf"))
    values, local = ops.topk_encode(x2, W_dead, b_dead, k_launch)
    values = torch.where(torch.arange(k_launch, device=values.device) < k, values, 0)  # the k largest
    indices = padded_ids[local]
    scale = sae.decoder_row_scale()
    if scale is not None:  # "forward" decoder norm: the rows as the forward pass uses them
        values = values * scale[indices].to(values.dtype)
    zero_bias = torch.zeros(d_in, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    error_hat = ops.sparse_decode(values, indices, sae.W_dec, zero_bias).float()
    variance = (error - error.mean(0)).pow(2).sum().clamp_min(1e-12)
    return min(1.0, n_dead / k_aux) * (error_hat - error).pow(2).sum() / variance


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
