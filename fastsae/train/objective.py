"""The training objective: one batch through the model and its SAEs, and the table of loss terms.

One e2e batch:
    1. clean run, no grad: the final hidden state h_orig, the residual at the first SAE's block
       (resid_pre) and the downstream hooks' activations. No logits.
    2. spliced run from that cached residual: the blocks before the first SAE are not run again,
       and the backward pass goes only through the blocks after it. Each SAE replaces its hook's
       activation (E2ESAE.training_forward: no dense code); the final hidden state h_sae comes out.
    3. KL(p_orig || p_sae) from (h_sae, h_orig, W_U) by fastsae.ops.fused_linear_kl, which never
       materialises the N x V logits; it also returns the CE of both runs and top-1 agreement.
    4. the loss: the run's terms (kl, downstream, local_mse) and every SAE kind's named terms
       (SAEForward.terms: sparsity, auxk, ...), each times its coefficient, summed; a term whose
       coefficient is 0 is left out. Each is logged by name as loss/<name>.
Local training (no KL, no downstream term) runs the clean model only up to the last SAE hook. Eval
always runs the spliced model.

A transcoder "IN->OUT" (fastsae.spec.hook_in_out) reads IN and replaces OUT: the spliced run records
its activation at IN and, at OUT, swaps the activation the model computed there (the MLP's output)
for the transcoder's; that computed activation is its target, the one its MSE terms and metrics
compare with (an SAE's target is its own input). The spliced run starts at IN's block; later hooks
(downstream, eval) come after OUT. Local training reads IN and OUT in one clean run.

loss.balance (Karvonen 2025, `fastsae finetune`) replaces the fixed kl_coeff and local_mse_coeff by
this batch's balanced weights (term_weights): with "mse", local_mse_coeff / 2 on every SAE's MSE and
local_mse_coeff x kl_coeff / 2 x (MSE / KL) on the KL, MSE the sum over the SAEs and the ratio
detached, so the two halves are equal in value and their sum keeps the MSE's scale ("kl": the same
the other way round). Every term named by those coefficients (the kinds' too) takes the balanced
weight; kl_weight and local_mse_weight are logged.

A kind may also return further reconstructions to train (SAEForward.reconstructions, each with a
weight: Matryoshka's inner prefixes with prefix_loss="kl"): in training, the run's reconstruction
losses apply to each of them too: an e2e run splices each into one more run of the blocks after the
SAE (from the cached residual, as step 2) and adds weight x loss.kl_coeff x its KL as kl_<name>;
loss.local_mse_coeff > 0 adds weight x local_mse_coeff x its MSE as local_mse_<name>. Eval leaves
them out (their runs would double its cost).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from typing import NamedTuple

from fastsae.activations import LossTerm, SAEForward, TrainingSettings
from fastsae.spec import hook_in_out
from fastsae.train import losses
from fastsae.train.config import ConfigError, TrainConfig


class SAEPass(NamedTuple):
    """One coder's pass in a batch: its input x, its target (what its output must match: x for an
    SAE, the activation a transcoder replaces) and its SAEForward."""

    x: torch.Tensor
    target: torch.Tensor
    out: SAEForward


@dataclass
class Batch:
    """What one batch's passes produced, for the loss terms and the metrics."""

    tokens: torch.Tensor
    train: bool
    saes: dict = field(default_factory=dict)  # hook -> SAEPass (input, target, SAEForward)
    inputs: dict = field(default_factory=dict)  # transcoder hook -> its input, recorded at IN in a spliced run
    kl: torch.Tensor | None = None
    downstream: torch.Tensor | None = None  # the weighted downstream MSE (e2e+ds)
    clean: dict = field(default_factory=dict)  # hook -> clean activations
    captured: dict = field(default_factory=dict)  # hook -> spliced activations
    h_orig: torch.Tensor | None = None  # final hidden states of the clean and spliced runs (spliced passes)
    h_sae: torch.Tensor | None = None
    weights: dict = field(default_factory=dict)  # coefficient name -> the weight this batch's loss applied


# The order in which the per-SAE terms are added (then the kinds' other terms, as they come): the
# order of the sum decides its rounding, and runs keep their numbers.
SAE_TERM_ORDER = ("sparsity", "local_mse", "auxk")
# The floor of a balanced ratio's denominator (the paper's code adds 1e-8 to the KL).
BALANCE_EPS = 1e-8


def _applies(weight) -> bool:
    """Whether a term with this weight enters the loss: a balanced weight (a tensor) always does;
    reading its value would wait for the device."""
    return isinstance(weight, torch.Tensor) or weight != 0


class Objective:
    """The loss of a batch for the SAEs at ``hooks`` (in model order) spliced into ``lm``.

    trackers: hook -> DeadLatentTracker (the kinds' AuxK reads the dead latents). Calling it returns
    (loss, metrics, fire_counts): the differentiable loss, detached 0-d metrics, and per hook the
    tokens of the batch on which each of this process's latents fired (int32).
    """

    def __init__(self, config: TrainConfig, lm, saes: dict, hooks: list[str], layout, trackers: dict):
        self.config, self.lm, self.saes, self.hooks, self.layout = config, lm, saes, hooks, layout
        self.trackers = trackers
        self.io = {hook: hook_in_out(hook) for hook in hooks}  # hook -> (the hook it reads, the hook it writes)
        self.downstream = config.downstream_weights()
        last_written = self.io[hooks[-1]][1]
        last_sae_block = lm.block_index(last_written)
        for hook in self.downstream:
            if hook in self.touched_hooks() or lm.block_index(hook) < last_sae_block:
                raise ConfigError(f"config: loss.downstream_hooks: {hook!r} must come after the last SAE "
                                  f"hook {last_written!r}")
        try:
            self.start_hook = lm.start_point(self.io[hooks[0]][0])
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

    def touched_hooks(self) -> set[str]:
        """Every hook a coder reads or writes."""
        return {name for pair in self.io.values() for name in pair}

    def coefficients(self) -> dict[str, float]:
        """The run's loss coefficients by name, as the kinds' terms name them (LossTerm.coefficient)."""
        loss = self.config.loss
        return {"sparsity_coeff": loss.sparsity_coeff, "auxk_coeff": loss.auxk_coeff,
                "local_mse_coeff": loss.local_mse_coeff, "kl_coeff": loss.kl_coeff}

    def settings(self, hook: str, train: bool) -> TrainingSettings:
        """What the SAE at ``hook`` is told about the run: p, the coefficients, and in training the
        dead latents of its tracker (for AuxK) where loss.auxk_coeff is not 0."""
        loss = self.config.loss
        tracker = self.trackers.get(hook)
        dead = tracker.dead_mask() if train and tracker is not None and loss.auxk_coeff else None
        return TrainingSettings(p=loss.sparsity_p, coefficients=self.coefficients(), dead=dead, auxk_k=loss.auxk_k)

    def run_sae(self, hook: str, acts: torch.Tensor, train: bool = True, target: torch.Tensor | None = None) -> SAEPass:
        """The coder's training pass on acts, in its dtype and outside autocast -> SAEPass. target:
        a transcoder's (the activation at its OUT); an SAE's is its input."""
        sae = self.saes[hook]
        x = acts.to(sae.dtype)
        target = x if target is None else target.to(sae.dtype)
        with self._autocast(enabled=False):
            out = sae.training_forward(x, settings=self.settings(hook, train),
                                       target=target if sae.is_transcoder else None)
        return SAEPass(x, target, out)

    def replacements(self, batch: Batch) -> dict:
        """{hook name: the function a spliced run calls there}: each SAE's output at its hook; for
        a transcoder, its input recorded at IN (passed on unchanged) and its output at OUT. Each
        pass is recorded in the batch."""
        functions = {}
        for hook, (hook_in, hook_out) in self.io.items():
            if hook_in != hook_out:
                functions[hook_in] = self._recorder(hook, batch)
            functions[hook_out] = self._replacement(hook, batch)
        return functions

    def _recorder(self, hook: str, batch: Batch):
        def record(acts):
            batch.inputs[hook] = acts
            return acts

        return record

    def _replacement(self, hook: str, batch: Batch):
        hook_in, hook_out = self.io[hook]

        def replace(acts):
            if hook_in == hook_out:
                result = self.run_sae(hook, acts, batch.train)
            else:
                if hook not in batch.inputs:
                    raise ValueError(f"transcoder {hook!r}: the model reached {hook_out!r} before {hook_in!r}; a "
                                     "transcoder reads a hook that comes before the one it writes")
                result = self.run_sae(hook, batch.inputs.pop(hook), batch.train, target=acts)
            batch.saes[hook] = result
            return result.out.reconstruction.to(acts.dtype)  # back to the LM's dtype

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
                batch.h_orig = h_orig
                start = {} if self.start_hook is None else {"start_hook": self.start_hook,
                                                             "start_acts": batch.clean[self.start_hook]}
                h_sae, batch.captured = lm.spliced_run(batch.tokens, self.replacements(batch),
                                                       capture_hooks=watched, **start)
            else:
                acts = lm.activations(batch.tokens, sorted(self.touched_hooks()))
                for hook, (hook_in, hook_out) in self.io.items():
                    batch.saes[hook] = self.run_sae(hook, acts[hook_in], train,
                                                    None if hook_in == hook_out else acts[hook_out])

        if spliced:
            batch.h_sae = h_sae
            with self._autocast(enabled=False):
                batch.kl, stats = self._kl(h_sae, h_orig, batch.tokens)
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
            _, target, out = batch.saes[hook]  # a transcoder's metrics: of the output it replaces
            metrics[f"l0/{hook}"] = out.l0
            metrics[f"mse/{hook}"] = losses.mse_loss(out.reconstruction, target).detach()
            metrics[f"explained_variance/{hook}"] = losses.explained_variance(target, out.reconstruction)
            if not train:  # the variants the paper's code logs, to compare with its published runs
                metrics[f"explained_variance_ln/{hook}"] = losses.explained_variance_ln(target, out.reconstruction)
                metrics[f"explained_variance_out_to_in/{hook}"] = losses.explained_variance_out_to_in(
                    target, out.reconstruction)
                metrics[f"explained_variance_out_to_in_ln/{hook}"] = losses.explained_variance_out_to_in(
                    target, out.reconstruction, layer_norm=True)
            fire_counts[hook] = out.fire_counts
        metrics["l0"] = torch.stack([metrics[f"l0/{h}"] for h in self.hooks]).mean()
        if self.config.loss.balance is not None and batch.weights:
            metrics.update(kl_weight=torch.as_tensor(batch.weights["kl_coeff"]).detach(),
                           local_mse_weight=torch.as_tensor(batch.weights["local_mse_coeff"]).detach())
        loss = sum(terms.values())
        metrics["loss"] = loss.detach()
        metrics.update({f"loss/{name}": term.detach() for name, term in terms.items()})
        if keep_batch:
            return loss, metrics, fire_counts, batch
        return loss, metrics, fire_counts

    def _kl(self, h_sae: torch.Tensor, h_orig: torch.Tensor, tokens: torch.Tensor):
        return losses.kl_loss(h_sae.float(), h_orig.float(), self.W_U, self.b_U,
                              labels=losses.next_token_labels(tokens), softcap=self.lm.logit_softcap)

    def term_weights(self, batch: Batch, mses: dict[str, torch.Tensor]) -> dict:
        """The run's coefficients by name as this batch's loss applies them: coefficients(), with
        kl_coeff and local_mse_coeff replaced by the balanced weights (0-d tensors) where
        loss.balance is set and the batch has a KL (mses: each SAE's MSE; see the module docstring)."""
        weights = self.coefficients()
        balance = self.config.loss.balance
        if balance is None or batch.kl is None or not mses:
            return weights
        mse = sum(mses.values()).detach().float()
        kl = batch.kl.detach().float()
        c_kl, c_mse = weights["kl_coeff"], weights["local_mse_coeff"]
        if balance == "mse":
            weights.update(local_mse_coeff=torch.as_tensor(0.5 * c_mse, device=kl.device),
                           kl_coeff=(0.5 * c_mse * c_kl) * mse / kl.clamp_min(BALANCE_EPS))
        else:
            weights.update(kl_coeff=torch.as_tensor(0.5 * c_kl, device=kl.device),
                           local_mse_coeff=(0.5 * c_kl * c_mse) * kl / mse.clamp_min(BALANCE_EPS))
        return weights

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """coefficient x term for the run's terms and every SAE's, in a fixed order, leaving out a
        term whose coefficient is 0 or that the batch does not have (the KL of a local pass). The
        weights applied are kept in batch.weights."""
        loss = self.config.loss
        mses = {hook: losses.mse_loss(batch.saes[hook].out.reconstruction, batch.saes[hook].target)
                for hook in self.hooks} if loss.local_mse_coeff else {}
        batch.weights = weights = self.term_weights(batch, mses)
        terms = {}
        if loss.kl_coeff and batch.kl is not None:
            terms["kl"] = weights["kl_coeff"] * batch.kl
        if self.downstream and batch.downstream is not None:
            terms["downstream"] = 1.0 * batch.downstream
        per_sae: dict[str, list[torch.Tensor]] = {name: [] for name in SAE_TERM_ORDER}
        for hook in self.hooks:
            out = batch.saes[hook].out
            named = dict(out.terms)
            if loss.local_mse_coeff:
                named["local_mse"] = LossTerm(mses[hook], "local_mse_coeff")
            for name, term in named.items():
                weight = 1.0 if term.coefficient is None else weights[term.coefficient]
                if _applies(weight):
                    per_sae.setdefault(name, []).append(term.value if term.coefficient is None else weight * term.value)
        for name, parts in per_sae.items():
            if parts:
                total = parts[0]
                for part in parts[1:]:
                    total = total + part
                terms[name] = total
        if batch.train:
            terms.update(self.reconstruction_terms(batch, weights))
        return terms

    def reconstruction_terms(self, batch: Batch, weights: dict | None = None) -> dict[str, torch.Tensor]:
        """The run's reconstruction losses of the kinds' further reconstructions
        (SAEForward.reconstructions; see the module docstring): kl_<name> (one more spliced run
        each) and local_mse_<name>, weighted as the batch's own (weights: term_weights())."""
        loss = self.config.loss
        weights = weights or self.coefficients()
        extra = [(hook, name, value, weight) for hook in self.hooks
                 for name, (value, weight) in (batch.saes[hook].out.reconstructions or {}).items()]
        if not extra:
            return {}
        terms = {}
        if loss.kl_coeff:
            if len(self.hooks) > 1:
                raise ConfigError(f"config: saes.params: the SAE kind {self.saes[extra[0][0]].activation!r} asks for "
                                  "the KL of further reconstructions (one spliced run each), which fastsae runs for "
                                  f"one SAE hook; this run has {len(self.hooks)}")
            start = {} if self.start_hook is None else {"start_hook": self.start_hook,
                                                         "start_acts": batch.clean[self.start_hook]}
            with self._autocast():
                h_orig = batch.h_orig
                for hook, name, value, weight in extra:
                    h_variant, _ = self.lm.spliced_run(
                        batch.tokens, {self.io[hook][1]: lambda acts, v=value: v.to(acts.dtype)}, **start)
                    with self._autocast(enabled=False):
                        kl, _ = self._kl(h_variant, h_orig, batch.tokens)
                    terms[f"kl_{name}"] = (weight * weights["kl_coeff"]) * kl
        if loss.local_mse_coeff:
            for hook, name, value, weight in extra:
                terms[f"local_mse_{name}"] = (weight * weights["local_mse_coeff"]) * losses.mse_loss(
                    value, batch.saes[hook].target)
        return terms
