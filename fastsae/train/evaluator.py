"""The eval pass: held-out metrics of the spliced model, without an optimizer.

The trainer evaluates through it at the end of a run (and every eval.every steps); `fastsae eval`
and the sweep build one directly (Evaluator.build) to evaluate saved or released SAEs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fastsae import distributed
from fastsae.spec import hook_in_out
from fastsae.train import setup
from fastsae.train.config import ConfigError, TrainConfig
from fastsae.train.data import TokenStream
from fastsae.train.metrics import firing_counts, write_eval_json
from fastsae.train.objective import Objective
from fastsae.train.saebench_core import CoreMetrics, core_eval_config, special_token_ids, zero_ablated_hidden


def reconstruction_hooks(lm, sae_hooks: list[str]) -> list[str]:
    """The hooks where eval compares the spliced run with the clean one, as the paper's eval:
    blocks.L.hook_resid_pre for every block L after the first SAE's block, and the final residual
    (the last block's hook_resid_post, before ln_final); SAE hooks excluded. sae_hooks: in model
    order."""
    first = max(lm.block_index(hook_in_out(sae_hooks[0])[0]), -1)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(first + 1, lm.n_layers)]
    names.append(f"blocks.{lm.n_layers - 1}.hook_resid_post")
    touched = {name for hook in sae_hooks for name in hook_in_out(hook)}
    return [hook for hook in names if hook not in touched]


class Evaluator:
    """Evaluates ``objective``'s SAEs on the held-out data: the config's eval split, or
    ``eval_dataset`` (a TokenStream, an iterable of [batch, ctx] token batches, a datasets.Dataset,
    ...; read from its start at every evaluate())."""

    def __init__(self, objective: Objective, eval_dataset=None):
        self.objective, self.config, self.lm = objective, objective.config, objective.lm
        self.eval_dataset = eval_dataset
        # a TokenStream given as eval data: every eval restarts it where it stood when given
        self._eval_start = eval_dataset.state_dict() if isinstance(eval_dataset, TokenStream) else None

    @classmethod
    def build(cls, config: TrainConfig, saes: dict, *, model=None, eval_dataset=None) -> "Evaluator":
        """An evaluator of ``saes`` ({hook: E2ESAE or a path from_pretrained reads}) on the config's
        model and held-out data: no optimizer, no run directory."""
        device = setup.resolve_device(config.device)
        lm, device = setup.load_language_model(config, model, device)
        lm.check_logit_free_path()
        hooks = setup.check_hooks(config, lm)
        layout = distributed.SINGLE
        saes = setup.build_saes(config, hooks, lm, layout, device, saes)
        return cls(Objective(config, lm, saes, hooks, layout, trackers={}), eval_dataset)

    def reconstruction_hooks(self) -> list[str]:
        return reconstruction_hooks(self.lm, self.objective.hooks)

    def _batches(self):
        """(iterator of eval batches, whether it loops: a stream built here from the start of the
        held-out data, which wraps around at its end)."""
        cfg = self.config
        if self.eval_dataset is None:
            return iter(setup.build_stream(cfg, self.lm, "eval", cfg.eval.batch_size)), True
        batches = iter(setup.adapt_data(cfg, self.lm, self.eval_dataset, cfg.eval.batch_size, "eval_dataset"))
        if self._eval_start is not None:
            batches.load_state_dict(self._eval_start)
        # a datasets.Dataset becomes a stream built here, from its start, that loops like ours
        return batches, hasattr(batches, "epoch")

    def _saebench_metrics(self) -> CoreMetrics:
        objective = self.objective
        if len(objective.hooks) != 1:
            raise ConfigError(f"SAEBench's core metrics are of one SAE spliced alone; this eval has "
                             f"{len(objective.hooks)} ({objective.hooks}): evaluate one (--sae PATH@HOOK)")
        hook = objective.hooks[0]
        if objective.saes[hook].shard_count != 1:
            raise ConfigError("SAEBench's core metrics need a whole SAE; evaluate it unsharded (saes.shards=1)")
        return CoreMetrics(objective.saes[hook], hook, special_token_ids(self.lm.tokenizer))

    def _saebench_batch(self, core: CoreMetrics, batch) -> None:
        """SAEBench's metrics of one batch: the zero-ablated run from the same cached residual."""
        objective, hook = self.objective, core.hook
        start = objective.start_hook
        with objective._autocast():  # the precision of the clean and spliced runs it is compared with
            # zeroed where the coder writes (a transcoder: its OUT, the MLP's output)
            ablated = zero_ablated_hidden(self.lm, batch.tokens, objective.io[hook][1], start,
                                          None if start is None else batch.clean[start])
        sae_pass = batch.saes[hook]  # a transcoder is measured against the output it replaces
        core.add_batch(batch.tokens, sae_pass.x, sae_pass.out.reconstruction, batch.h_orig, batch.h_sae, ablated,
                       objective.W_U, objective.b_U, self.lm.logit_softcap, target=sae_pass.target)

    @torch.no_grad()
    def evaluate(self, n_tokens: int | None = None, *, run_dir: str | Path | None = None, step: int = 0,
                 training_tokens: int = 0, saebench: bool = False) -> dict:
        """The eval metrics of the spliced model, as "eval/<name>".

        Besides the training metrics: downstream_mse/<hook> and downstream_explained_variance/<hook>
        at every reconstruction_hooks() hook, alive/<hook>, the latents that fired on the eval
        tokens, and rare/<hook>, those that fired on fewer than metrics.RARE_FREQUENCY of them.
        saebench: also SAEBench's core metrics of the (one) SAE, from the same batches (one more
        spliced pass per batch; fastsae.train.saebench_core), as the CoreEvalOutput record under the
        key "saebench" (no "eval/" prefix). With ``run_dir`` (an existing directory) the result is
        also written to RUN_DIR/eval.json (atomically, from rank 0; see metrics.write_eval_json),
        with the step and training tokens of the SAEs evaluated, and the SAEBench record without its
        per-latent rows.
        """
        cfg, objective = self.config, self.objective
        recon_hooks = tuple(self.reconstruction_hooks())
        n_tokens = n_tokens or cfg.eval.n_tokens
        core = self._saebench_metrics() if saebench else None
        batches, loops = self._batches()
        start_epoch = batches.epoch if loops else 0
        saes = objective.saes
        for sae in saes.values():
            sae.eval()
        sums: dict[str, float] = {}
        fire_counts = {hook: torch.zeros(sae.n_local, dtype=torch.int64, device=objective.device)
                       for hook, sae in saes.items()}
        seen = 0
        try:
            while seen < n_tokens:
                try:
                    tokens = next(batches)
                except StopIteration:
                    break
                # Token streams loop forever: a batch drawn after the held-out data wrapped around
                # would count tokens twice, so the pass ends at the first one.
                if loops and batches.epoch > start_epoch:
                    warnings.warn(f"the held-out data ran out after {seen} tokens (eval asked for {n_tokens}); "
                                  "each held-out token was evaluated once", stacklevel=3)
                    break
                _, metrics, batch_counts, batch = objective(tokens, train=False, recon_hooks=recon_hooks,
                                                            keep_batch=True)
                if core is not None:
                    self._saebench_batch(core, batch)
                del batch  # the batch's activations: not held while the next batch runs
                n = tokens.numel()
                for key, value in metrics.items():  # token-weighted means over the eval set
                    sums[key] = sums.get(key, 0.0) + float(value) * n
                for hook, counts in batch_counts.items():
                    fire_counts[hook] += counts
                seen += n
        finally:
            for sae in saes.values():
                sae.train()
        if seen == 0:
            raise RuntimeError("the eval data yielded no full batch: it holds fewer than eval.batch_size x "
                               "data.context_length tokens")
        out = {f"eval/{key}": value / seen for key, value in sums.items()}
        for hook, counts in fire_counts.items():  # alive/<hook> and rare/<hook>
            for name, value in firing_counts(counts, seen).items():
                out[f"eval/{name}/{hook}"] = int(distributed.sum_over_shards(value, objective.layout))
        out["eval/tokens"] = seen
        extra = {}
        if core is not None:
            dataset = None if self.eval_dataset is None else f"the caller's eval_dataset ({type(self.eval_dataset).__name__})"
            extra["saebench"] = core.output(core_eval_config(cfg, core.batches, dataset))
        if run_dir is not None and objective.layout.is_main and Path(run_dir).is_dir():
            # eval.json keeps SAEBench's record without its n_latents per-latent rows (still a valid
            # CoreEvalOutput: the details default to empty); `fastsae eval --saebench` writes them
            brief = {key: {**value, "eval_result_details": []} for key, value in extra.items()}
            write_eval_json(run_dir, out, cfg.to_dict(), step=step, training_tokens=training_tokens,
                            n_latents=sum(sae.n_latents for sae in saes.values()), extra=brief)
        return {**out, **extra}


def evaluate_run(run_dir: str | Path, *, overrides: list[str] | None = None, n_tokens: int | None = None,
                 model=None, saebench: bool = False) -> tuple[dict, Path, dict]:
    """Evaluate the latest checkpoint of a run with the run's config (config.yaml and the overrides
    of its resumes, then ``overrides``) and write RUN_DIR/eval.json (saebench: with SAEBench's core
    record, see Evaluator.evaluate). Returns (metrics, the checkpoint evaluated, its trainer state)."""
    from fastsae.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    config = ckpt.load_run_config(run_dir, overrides)
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
    saes, state = ckpt.load_checkpoint(path, device=setup.resolve_device(config.device))
    evaluator = Evaluator.build(config, saes, model=model)
    metrics = evaluator.evaluate(n_tokens, run_dir=run_dir, step=state["step"], training_tokens=state["tokens_seen"],
                                 saebench=saebench)
    return metrics, path, state
