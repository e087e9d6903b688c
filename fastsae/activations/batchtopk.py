"""BatchTopK (Bussmann et al. 2024): the k x N largest ReLU pre-activations of the whole batch.

While training, a batch of N tokens keeps its k x N largest ReLU pre-activations over all tokens
and latents together, so a token may keep more or fewer than k (k may be fractional). fastsae
selects exactly and never builds the [N, n_latents] pre-activations: the TopK encoder keeps each
token's largest `candidates` values (twice k), the k x N-th largest of those is the
threshold t, and every candidate >= t (and > 0) is kept. That is the batch's selection as long as no
token has a value >= t beyond its candidates, which holds when each token's smallest candidate is
below t (or not positive); where it is not (a smallest candidate equal to t may be followed by more
values equal to it), select() asks for twice the candidates and the encoder runs again (and later
batches start from the wider width). Ties at t are all kept, as dense_forward keeps them. A sharded SAE gathers every
shard's candidates first, so it selects the same set. The batch is what one process sees in one
micro-batch (as SAELens under DDP): data-parallel ranks and gradient accumulation select within
their own rows.

At inference (eval, export) the code is a JumpReLU with one threshold for every latent, a running
average of the smallest kept value during training (SAELens: topk_threshold, updated with rate
topk_threshold_lr), so one token's code does not depend on the others'. The training pass returns
the updated average as its state (SAEForward.state), which the SAE writes; encode() in training mode
selects without moving it. In eval mode the pass is the elementwise one, with that threshold.

SAELens reads it as a "jumprelu" file (as SAELens saves its own BatchTopK SAEs) and writes
"batchtopk" training files, which load here too; sparsify has no batch selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastsae.activations import paths
from fastsae.activations.auxk import auxk_term, check_auxk_sharding
from fastsae.activations.base import Activation, ExtraTensor, SparseCode, check_number

# Candidates per token the encoder keeps, as a multiple of k, before any widening: the encoder's
# backward runs over every candidate (the ones not kept get a zero gradient), so a step costs about
# what a TopK SAE's with k = CANDIDATE_FACTOR x k does.
CANDIDATE_FACTOR = 2


@dataclass(frozen=True)
class BatchTopKParams:
    k: float  # active latents per token, on average over the batch
    threshold_lr: float = 0.01  # rate of the inference threshold's running average

    def validate(self, n_latents: int | None) -> None:
        check_number("k", self.k, low=0, low_open=True, high=n_latents)
        check_number("threshold_lr", self.threshold_lr, low=0, low_open=True, high=1, high_name="")


class BatchTopK(Activation):
    name = "batchtopk"
    Params = BatchTopKParams
    default_init = "topk"
    extra_tensors = {"threshold": ExtraTensor(per_latent=False, trainable=False, fill=lambda params: 0.0, fp32=True)}
    sparsify_refusal = ("sparsify stores per-token TopK SAEs; a BatchTopK SAE's training code is a batch selection "
                        "and its inference code a threshold (format='saelens' writes it as a JumpReLU SAE)")
    saelens_architectures = ("batchtopk",)
    saelens_tensors = ("topk_threshold", "threshold")
    example_params = {"k": 4}

    def __init__(self, params):
        super().__init__(params)
        self._width = 0  # the candidates per token that the last widening needed

    def threshold(self, sae) -> torch.Tensor:
        """The inference threshold for each latent held here (one value for all)."""
        return sae.threshold.to(sae.dtype).expand(sae.n_local)

    def candidates(self, n_latents: int) -> int:
        """The candidates per token the encoder keeps for select() (paths.select_code)."""
        return min(n_latents, max(self._width, math.ceil(CANDIDATE_FACTOR * self.params.k)))

    def select(self, values, indices, sae, training) -> SparseCode | None:
        """The batch's selection from each token's candidates (values [N, width] >= 0, each shard's
        block sorted largest first, indices global ids), or None for wider candidates."""
        n_tokens, width = values.shape
        keep = min(values.numel(), max(1, int(self.params.k * n_tokens)))
        threshold = values.reshape(-1).topk(keep, sorted=False).values.min()
        per_shard = width // sae.shard_count
        if per_shard < sae.n_local:
            # each shard's block is sorted largest first: its last column bounds what it left out
            smallest = values.reshape(n_tokens, sae.shard_count, per_shard)[..., -1]
            # A token may hold kept values beyond its candidates where its smallest candidate is
            # kept: values equal to it (ties at the threshold) or above the threshold may follow.
            if bool(((smallest >= threshold) & (smallest > 0)).any()):
                self._width = min(sae.n_local, 2 * per_shard)
                return None
        kept = (values >= threshold) & (values > 0)
        return SparseCode(torch.where(kept, values, torch.zeros_like(values)), indices)

    def training_forward(self, sae, x, settings):
        if not sae.training:  # inference: the elementwise path with the learned threshold
            out = paths.elementwise_pass(sae, x, settings.p, self.threshold(sae), None)
            return self.finish_pass(sae, out, None, settings)
        code = paths.select_code(sae, x, self)
        out = paths.selection_pass(sae, code, settings.p)
        return self.finish_pass(sae, out, code, settings, auxk_term(sae, x, out.reconstruction, settings),
                                state={"threshold": self.updated_threshold(sae, code)})

    def encode(self, sae, x):
        if sae.training:
            return paths.select_code(sae, x, self)
        return paths.elementwise_encode(sae, x, self.threshold(sae))

    def code_is_dense(self, sae):
        return not sae.training

    def encode_sparse(self, sae, x):
        return self.encode(sae, x) if sae.training else super().encode_sparse(sae, x)

    def memory(self, n_tokens, n_local, d_in, itemsize, shards, d_out=None):  # the code: d_out plays no part
        return paths.selection_memory(n_tokens, n_local, self.candidates(n_local), itemsize, shards)

    def check_run(self, *, shards, coefficients):
        check_auxk_sharding(shards, coefficients)

    def dense_forward(self, pre, sae, training):
        acts = torch.relu(pre)
        if training:
            keep = min(acts.numel(), max(1, int(self.params.k * acts.shape[0])))
            kept = acts >= acts.reshape(-1).topk(keep).values.min()
        else:
            kept = pre > self.threshold(sae)
        code = acts * (kept & (acts > 0))
        return code, (code > 0).sum(-1, dtype=pre.dtype)

    @torch.no_grad()
    def updated_threshold(self, sae, code: SparseCode) -> torch.Tensor:
        """(1 - lr) threshold + lr * (the smallest kept value of the batch), on the device (no sync);
        the threshold as it is where nothing was kept."""
        values = code.values.detach()
        kept = values > 0
        smallest = torch.where(kept, values.float(), torch.full_like(values, math.inf, dtype=torch.float32)).min()
        lr = self.params.threshold_lr
        return torch.where(kept.any(), (1 - lr) * sae.threshold + lr * smallest, sae.threshold)

    @classmethod
    def from_saelens(cls, config, tensors, where):
        if "topk_threshold" in tensors:  # SAELens's own training file
            threshold = tensors["topk_threshold"].reshape(())
        elif "threshold" in tensors:  # a JumpReLU file written from a BatchTopK SAE: one value everywhere
            threshold = tensors["threshold"]
            if threshold.numel() == 0 or not bool((threshold == threshold.reshape(-1)[0]).all()):
                raise ValueError(f"{where}: a BatchTopK SAE has one inference threshold for every latent; this "
                                 "file's thresholds differ (load it as a JumpReLU SAE)")
            threshold = threshold.reshape(-1)[0]
        else:
            raise ValueError(f"{where}: a BatchTopK SAE needs its inference threshold (topk_threshold)")
        k = config.get("k")
        params = {"k": k} if k is not None else {}
        if "topk_threshold_lr" in config:
            params["threshold_lr"] = config["topk_threshold_lr"]
        return params, {"threshold": threshold}

    def to_saelens(self, tensors) -> tuple[str, dict, dict]:
        return "jumprelu", {}, {"threshold": tensors["threshold"].expand(tensors["b_enc"].shape)}
