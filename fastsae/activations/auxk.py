"""AuxK (OpenAI's sparse_autoencoder; EleutherAI's sparsify): dead latents reconstruct the residual.

The selection kinds (TopK, BatchTopK, Matryoshka BatchTopK) add it to their loss terms as "auxk",
weighted by the run's loss.auxk_coeff, when the trainer gives them its dead latents
(TrainingSettings.dead). fastsae.train.losses re-exports auxk_loss.
"""

from __future__ import annotations

import torch

from fastsae import ops
from fastsae.activations.code import LossTerm, TrainingSettings


def auxk_loss(sae, x: torch.Tensor, reconstruction: torch.Tensor, dead: torch.Tensor,
              k_aux: int | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK: the k_aux largest pre-activations among the dead latents reconstruct e = x - x_hat
    (target - x_hat for a transcoder: target [N, d_out] is what the code's reconstruction must
    match; the dead latents still read x).

    dead: bool [n_latents]. Only the dead latents' columns of W_enc are read (an [n_dead, d_in]
    gather of its latent-major rows), and topk_encode walks the tokens in chunks, so no [N, n_latents] tensor is built.
    The gradient reaches only the dead latents' encoder and decoder rows: x and the error are
    detached. Loss = ||e_hat - e||^2 / ||e - mean(e)||^2 (as sparsify), scaled by
    min(1, n_dead / k_aux) so that a few dead latents do not get the full weight.
    """
    d_in, d_out = sae.d_in, sae.W_dec.shape[1]
    k_aux = k_aux or d_in // 2
    dead_ids = dead.nonzero().squeeze(1)
    n_dead = dead_ids.numel()
    if n_dead == 0:
        return x.new_zeros((), dtype=torch.float32)
    x2 = x.detach().reshape(-1, d_in)
    goal = x2 if target is None else target.detach().reshape(-1, d_out)
    error = (goal - reconstruction.detach().reshape(-1, d_out)).float()
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
    zero_bias = torch.zeros(d_out, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    error_hat = ops.sparse_decode(values, indices, sae.W_dec, zero_bias).float()
    variance = (error - error.mean(0)).pow(2).sum().clamp_min(1e-12)
    return min(1.0, n_dead / k_aux) * (error_hat - error).pow(2).sum() / variance


def auxk_term(sae, x: torch.Tensor, reconstruction: torch.Tensor, settings: TrainingSettings) -> dict:
    """{"auxk": LossTerm} where the run asks for AuxK (dead latents given, loss.auxk_coeff not 0),
    else {}."""
    if settings.dead is None or not settings.uses("auxk_coeff"):
        return {}
    target = None if settings.target is None else settings.reconstruction_target(x)
    return {"auxk": LossTerm(auxk_loss(sae, x, reconstruction, settings.dead, settings.auxk_k, target), "auxk_coeff")}


def check_auxk_sharding(shards: int, coefficients: dict) -> None:
    """AuxK reads every latent's encoder row; a sharded SAE holds a block of them."""
    if shards > 1 and coefficients.get("auxk_coeff", 0):
        raise ValueError("loss.auxk_coeff: AuxK is not implemented for sharded SAEs (saes.shards > 1); set "
                         "loss.auxk_coeff=0")
