"""The training objective: one batch through the model and its SAEs, and the table of loss terms.

One e2e batch:
    1. clean run, no grad: the final hidden state h_orig, the residual at the first SAE's block
       (resid_pre) and the downstream hooks' activations. No logits.
    2. spliced run from that cached residual: the blocks before the first SAE are not run again,
       and the backward pass goes only through the blocks after it. Each SAE replaces its hook's
       activation (E2ESAE.training_forward: no dense code); the final hidden state h_sae comes out.
    3. KL(p_orig || p_sae) from (h_sae, h_orig, W_U) by fastsae.ops.fused_linear_kl, which never
       materialises the N x V logits; it also returns the CE of both runs and top-1 agreement.
    4. the loss: the sum of the terms in LOSS_TERMS whose coefficient is not 0.
Local training (no KL, no downstream term) runs the clean model only up to the last SAE hook. Eval
always runs the spliced model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastsae.train import losses
from fastsae.train.config import ConfigError, TrainConfig


@dataclass
class Batch:
    """What one batch's passes produced, for the loss terms and the metrics."""

    tokens: torch.Tensor
    train: bool
    saes: dict = field(default_factory=dict)  # hook -> (the SAE's input x, its SAEForward)
    kl: torch.Tensor | None = None
    downstream: torch.Tensor | None = None  # the weighted downstream MSE (e2e+ds)
    clean: dict = field(default_factory=dict)  # hook -> clean activations
    captured: dict = field(default_factory=dict)  # hook -> spliced activations
    h_orig: torch.Tensor | None = None  # final hidden states of the clean and spliced runs (spliced passes)
    h_sae: torch.Tensor | None = None


@dataclass(frozen=True)
class LossTerm:
    """A loss term: its weight from the config (the term is skipped at 0), whether it is summed
    over the SAEs, and the bare term (objective, batch[, hook]) -> scalar, or None where the batch
    has none (the KL of a local pass, AuxK without a selection code)."""

    weight: Callable[[TrainConfig], float]
    per_sae: bool
    term: Callable
    help: str


def _kl(objective, batch):
    return batch.kl


def _downstream(objective, batch):
    return batch.downstream


def _sparsity(objective, batch, hook):
    return batch.saes[hook][1].sparsity


def _local_mse(objective, batch, hook):
    x, out = batch.saes[hook]
    return losses.mse_loss(out.reconstruction, x)


def _auxk(objective, batch, hook):
    x, out = batch.saes[hook]
    if not batch.train or out.code is None:  # AuxK needs a selection code (TopK, BatchTopK)
        return None
    dead = objective.trackers[hook].dead_mask()
    return losses.auxk_loss(objective.saes[hook], x, out.reconstruction, dead, objective.config.loss.auxk_k)


LOSS_TERMS = {
    "kl": LossTerm(lambda cfg: cfg.loss.kl_coeff, False, _kl, "loss.kl_coeff x KL(p_orig || p_sae)"),
    "downstream": LossTerm(lambda cfg: 1.0 if cfg.downstream_weights() else 0.0, False, _downstream,
                           "the MSE at the downstream hooks, each weighted by its share of loss.downstream_coeff"),
    "sparsity": LossTerm(lambda cfg: cfg.loss.sparsity_coeff, True, _sparsity,
                         "loss.sparsity_coeff x the activation's sparsity term"),
    "local_mse": LossTerm(lambda cfg: cfg.loss.local_mse_coeff, True, _local_mse,
                          "loss.local_mse_coeff x the MSE of each SAE's output vs its input"),
    "auxk": LossTerm(lambda cfg: cfg.loss.auxk_coeff, True, _auxk,
                     "loss.auxk_coeff x AuxK on dead latents (selection activations, in training)"),
}


class Objective:
    """The loss of a batch for the SAEs at ``hooks`` (in model order) spliced into ``lm``.

    trackers: hook -> DeadLatentTracker (AuxK reads the dead latents). Calling it returns
    (loss, metrics, fire_counts): the differentiable loss, detached 0-d metrics, and per hook the
    tokens of the batch on which each of this process's latents fired (int32).
    """

    def __init__(self, config: TrainConfig, lm, saes: dict, hooks: list[str], layout, trackers: dict):
        self.config, self.lm, self.saes, self.hooks, self.layout = config, lm, saes, hooks, layout
        self.trackers = trackers
        self.downstream = config.downstream_weights()
        last_sae_block = lm.block_index(hooks[-1])
        for hook in self.downstream:
            if hook in hooks or lm.block_index(hook) < last_sae_block:
                raise ConfigError(f"config: loss.downstream_hooks: {hook!r} must come after the last SAE "
                                  f"hook {hooks[-1]!r}")
        try:
            self.start_hook = lm.start_point(hooks[0])
        except ValueError:  # an SAE on the embedding: the spliced run starts from the tokens
            self.start_hook = None
        self.amp_dtype = torch.bfloat16 if config.amp == "bf16" else None
        self.device = lm.device
        # W_U for the KL in fp32 (a copy only when the LM is not fp32): the op's math is fp32, and
        # rounding both hidden states to bf16 would add noise of the size of a small KL.
        self.W_U = lm.W_U.detach().float()
        self.b_U = None if lm.b_U is None else lm.b_U.detach().float()

    def _autocast(self, enabled: bool = True):
        """bf16 autocast for the LM passes (enabled=False: switched off inside them); without amp,
        no autocast context at all."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    def run_sae(self, hook: str, acts: torch.Tensor):
        """The SAE's training pass on acts, in the SAE's dtype and outside autocast -> (x, SAEForward)."""
        sae = self.saes[hook]
        x = acts.to(sae.dtype)
        with self._autocast(enabled=False):
            return x, sae.training_forward(x, self.config.loss.sparsity_p)

    def replacement(self, hook: str, batch: Batch):
        """The function a spliced run calls at ``hook``: the SAE's output, recorded in the batch."""
        def replace(acts):
            x, out = self.run_sae(hook, acts)
            batch.saes[hook] = (x, out)
            return out.reconstruction.to(acts.dtype)  # back to the LM's dtype

        return replace

    def __call__(self, tokens: torch.Tensor, *, train: bool, recon_hooks: tuple[str, ...] = (),
                 keep_batch: bool = False):
        """(loss, metrics, fire_counts) of one batch; see the class docstring.

        recon_hooks (eval): later hooks where the spliced run's activations are compared with the
        clean run's (downstream_mse/<hook>, downstream_explained_variance/<hook>).
        keep_batch: also return the Batch (SAE inputs and outputs, cached activations, final hidden
        states), as a fourth element, for metrics computed from the same passes (SAEBench's).
        """
        cfg, lm = self.config, self.lm
        batch = Batch(tokens.to(lm.device, torch.long), train)
        metrics: dict[str, torch.Tensor] = {}
        spliced = cfg.is_e2e or not train  # eval always measures the spliced model
        with self._autocast():
            if spliced:
                watched = list(dict.fromkeys([*self.downstream, *recon_hooks]))  # loss hooks first
                cache_hooks = [h for h in [self.start_hook, *watched] if h is not None]
                h_orig, batch.clean = lm.clean_run(batch.tokens, cache_hooks)
                start = {} if self.start_hook is None else {"start_hook": self.start_hook,
                                                             "start_acts": batch.clean[self.start_hook]}
                batch.h_orig = h_orig
                h_sae, batch.captured = lm.spliced_run(
                    batch.tokens, {hook: self.replacement(hook, batch) for hook in self.hooks},
                    capture_hooks=watched, **start)
            else:
                for hook, acts in lm.activations(batch.tokens, self.hooks).items():
                    batch.saes[hook] = self.run_sae(hook, acts)

        if spliced:
            batch.h_sae = h_sae
            with self._autocast(enabled=False):
                batch.kl, stats = losses.kl_loss(h_sae.float(), h_orig.float(), self.W_U, self.b_U,
                                                 labels=losses.next_token_labels(batch.tokens),
                                                 softcap=lm.logit_softcap)
            metrics.update(kl=batch.kl.detach(), ce_orig=stats.ce_orig, ce_sae=stats.ce_sae,
                           ce_increase=stats.ce_sae - stats.ce_orig, top1_agreement=stats.top1_agreement)
            if self.downstream:
                batch.downstream, per_hook = losses.downstream_loss(batch.captured, batch.clean, self.downstream)
                metrics.update({f"downstream_mse/{h}": v for h, v in per_hook.items()})
            for hook in recon_hooks:
                clean, spliced_acts = batch.clean[hook], batch.captured[hook]
                metrics[f"downstream_mse/{hook}"] = losses.mse_loss(spliced_acts, clean).detach()
                metrics[f"downstream_explained_variance/{hook}"] = losses.explained_variance(clean, spliced_acts)
                metrics[f"downstream_explained_variance_ln/{hook}"] = losses.explained_variance_ln(clean, spliced_acts)

        terms = self.loss_terms(batch)
        fire_counts = {}
        for hook in self.hooks:
            x, out = batch.saes[hook]
            metrics[f"l0/{hook}"] = out.l0
            metrics[f"mse/{hook}"] = losses.mse_loss(out.reconstruction, x).detach()
            metrics[f"explained_variance/{hook}"] = losses.explained_variance(x, out.reconstruction)
            if not train:  # the variants the paper's code logs, to compare with its published runs
                metrics[f"explained_variance_ln/{hook}"] = losses.explained_variance_ln(x, out.reconstruction)
                metrics[f"explained_variance_out_to_in/{hook}"] = losses.explained_variance_out_to_in(
                    x, out.reconstruction)
                metrics[f"explained_variance_out_to_in_ln/{hook}"] = losses.explained_variance_out_to_in(
                    x, out.reconstruction, layer_norm=True)
            fire_counts[hook] = out.fire_counts
        metrics["l0"] = torch.stack([metrics[f"l0/{h}"] for h in self.hooks]).mean()
        loss = sum(terms.values())
        metrics["loss"] = loss.detach()
        metrics.update({f"loss/{name}": term.detach() for name, term in terms.items()})
        if keep_batch:
            return loss, metrics, fire_counts, batch
        return loss, metrics, fire_counts

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """weight x term for every LOSS_TERMS entry whose weight is not 0 and that the batch has."""
        terms = {}
        for name, spec in LOSS_TERMS.items():
            weight = spec.weight(self.config)
            if not weight:
                continue
            parts = ([spec.term(self, batch, hook) for hook in self.hooks] if spec.per_sae
                     else [spec.term(self, batch)])
            parts = [weight * part for part in parts if part is not None]
            if parts:
                total = parts[0]
                for part in parts[1:]:
                    total = total + part
                terms[name] = total
        return terms
