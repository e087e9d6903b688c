"""The SAE trainer: local, e2e and e2e+ds training of one or more SAEs spliced into a frozen LM.

    trainer = Trainer(load_config("embedded"))
    trainer.fit()                       # or, by hand: metrics = trainer.step(tokens)

One training step (per micro-batch), e2e:
    1. clean run, no grad: the final hidden state h_orig, the residual at the first SAE's block
       (resid_pre) and the downstream hooks' activations. No logits.
    2. spliced run from that cached residual: the blocks before the first SAE are not run again,
       and the backward pass goes only through the blocks after it. Each SAE replaces its hook's
       activation; the final hidden state h_sae comes out. No logits.
    3. KL(p_orig || p_sae) from (h_sae, h_orig, W_U) by fastsae.ops.fused_linear_kl, which never
       materialises the N x V logits; it also returns the CE of both runs and top-1 agreement.
    4. + sparsity (+ downstream MSE, + local MSE, + AuxK for TopK SAEs); backward.
Local training (no KL, no downstream term) runs the clean model only up to the last SAE hook.

Then: gradient clipping on the SAE parameters, Adam, the LR schedule (linear warmup by samples,
cosine to min_lr_factor), and for decoder_norm="project" the parallel-gradient removal before the
step and the row projection after it. The LM is frozen: no gradient, not in the optimizer.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from fastsae.sae import E2ESAE, SparseCode
from fastsae.train import checkpoint as ckpt
from fastsae.train import losses
from fastsae.train.config import ConfigError, TrainConfig, load_config
from fastsae.train.metrics import DeadLatentTracker, MetricsLogger, format_metrics, truncate_metrics

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The metrics printed at the end of fit() and by `fastsae eval`, in this order (then per SAE).
SUMMARY_KEYS = ["kl", "ce_orig", "ce_sae", "ce_increase", "top1_agreement", "l0"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """Linear warmup over warmup_steps, then cosine decay from 1 to min_factor at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains the SAEs of `config` (a TrainConfig, a preset name / YAML path, or a dict).

    model: a fastsae LanguageModel, a TransformerLens model (HookedTransformer or
        TransformerBridge), a name or directory, or None to load config.model.name.
    dataset: a TokenStream, any iterable of LongTensor [batch, ctx] batches (re-iterable for
        exact resume), or None to build one from config.data.
    eval_dataset: the same for the eval pass; None builds the eval split from config.data.
    saes: optional {hook: E2ESAE} to start from instead of fresh ones.
    """

    def __init__(self, config, model=None, dataset=None, *, eval_dataset=None, run_dir=None,
                 saes: dict[str, E2ESAE] | None = None):
        if not isinstance(config, TrainConfig):
            config = load_config(config)
        self.config = cfg = config
        self.device = resolve_device(cfg.device)
        self.lm = self._language_model(model)
        self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None

        # Hooks in the order the model computes them; the spliced run starts at the first one.
        for hook in [*cfg.saes.hooks, *cfg.loss.downstream_hooks]:
            try:
                self.lm.validate_hook(hook)
            except ValueError as error:
                raise ConfigError(f"config: {error}") from None
        self.hooks = sorted(cfg.saes.hooks, key=self.lm.block_index)
        self.downstream = cfg.downstream_weights()
        last_sae_block = self.lm.block_index(self.hooks[-1])
        for hook in self.downstream:
            if hook in self.hooks or self.lm.block_index(hook) < last_sae_block:
                raise ConfigError(f"config: loss.downstream_hooks: {hook!r} must come after the last SAE "
                                 f"hook {self.hooks[-1]!r}")
        try:
            self.start_hook = self.lm.start_point(self.hooks[0])
        except ValueError:  # an SAE on the embedding: the spliced run starts from the tokens
            self.start_hook = None

        # The SAEs, built from the seed so that two runs of one config start equal.
        sae_dtype = _DTYPES[cfg.saes.dtype]
        if saes is None:
            torch.manual_seed(cfg.seed)
            n_latents = cfg.saes.n_latents or int(round(cfg.saes.ratio * self.lm.d_model))
            saes = {hook: E2ESAE(self.lm.d_model, n_latents, cfg.saes.activation, cfg.saes.k,
                                 decoder_norm=cfg.saes.decoder_norm,
                                 init_encoder_as_decoder_transpose=cfg.saes.init_encoder_as_decoder_transpose,
                                 metadata={"hook": hook, "model": cfg.model.name, "run": cfg.name},
                                 dtype=sae_dtype, device=self.device)
                    for hook in self.hooks}
        if sorted(saes) != sorted(self.hooks):
            raise ValueError(f"saes must have one SAE per hook in config.saes.hooks {self.hooks}, got {sorted(saes)}")
        self.saes = {hook: saes[hook].to(self.device) for hook in self.hooks}
        self.params = [p for hook in self.hooks for p in self.saes[hook].parameters()]

        self.optimizer = torch.optim.Adam(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        warmup, total, floor = cfg.warmup_steps, cfg.total_steps, cfg.optim.min_lr_factor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, floor))
        self.trackers = {hook: DeadLatentTracker(sae.n_latents, cfg.log.dead_window_tokens, self.device)
                         for hook, sae in self.saes.items()}

        # W_U for the KL in fp32 (a copy only when the LM is not fp32): the op's math is fp32, and
        # rounding both hidden states to bf16 would add noise of the size of a small KL.
        self.W_U = self.lm.W_U.detach().float()
        self.b_U = None if self.lm.b_U is None else self.lm.b_U.detach().float()

        self.dataset = dataset
        self.eval_dataset = eval_dataset
        self.run_dir = Path(run_dir or cfg.run_dir or
                            Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self.step_count = 0
        self.tokens_seen = 0
        self._stream = None  # the training batches, built on first use
        self._batches = None
        self._batches_consumed = 0  # for plain iterables: how many to skip on resume
        self._resume_point = None  # data/RNG state before the batch of a step in progress
        self._updating = False  # inside optimizer.step(): an interrupt there leaves no clean state
        self._stop_signal = None
        self._wandb_id = None

    # ------------------------------------------------------------------ construction helpers

    def _language_model(self, model):
        from fastsae.model.lm import LanguageModel

        cfg = self.config
        if model is None or isinstance(model, (str, Path)):
            return LanguageModel.load(str(model or cfg.model.name), device=self.device,
                                      dtype=_DTYPES[cfg.model.dtype], api=cfg.model.api)
        if isinstance(model, LanguageModel):
            if model.device != self.device and cfg.device != "auto":
                raise ValueError(f"the model is on {model.device} but config.device is {cfg.device!r}")
            self.device = model.device
            return model
        lm = LanguageModel.wrap(model)
        self.device = lm.device
        return lm

    def _build_stream(self, split: str, batch_size: int):
        from fastsae.train.data import build_token_stream

        cfg = self.config
        return build_token_stream(cfg.data_spec(), self.lm.tokenizer, context_length=cfg.data.context_length,
                                  batch_size=batch_size, split=split, seed=cfg.seed)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    # ------------------------------------------------------------------ the passes

    def _run_sae(self, hook: str, acts: torch.Tensor):
        """The SAE on acts, in the SAE's dtype and outside autocast -> (x, SAEOutput)."""
        sae = self.saes[hook]
        x = acts.to(sae.dtype)
        with torch.autocast(self.device.type, enabled=False):
            return x, sae(x, return_code=True)

    def _replacement(self, hook: str, records: dict):
        def replace(acts):
            x, out = self._run_sae(hook, acts)
            records[hook] = (x, out)
            return out.reconstruction.to(acts.dtype)  # back to the LM's dtype

        return replace

    def _forward(self, tokens: torch.Tensor, *, train: bool):
        """Loss (differentiable) and detached metrics of one batch, plus the latents that fired."""
        cfg, lm = self.config, self.lm
        coeffs = cfg.loss
        tokens = tokens.to(lm.device, torch.long)
        records: dict[str, tuple[torch.Tensor, object]] = {}
        metrics: dict[str, torch.Tensor] = {}
        terms: dict[str, torch.Tensor] = {}
        spliced = cfg.is_e2e or not train  # eval always measures the spliced model

        with self._autocast():
            if spliced:
                cache_hooks = [h for h in [self.start_hook, *self.downstream] if h is not None]
                h_orig, clean = lm.clean_run(tokens, cache_hooks)
                start = {} if self.start_hook is None else {"start_hook": self.start_hook,
                                                             "start_acts": clean[self.start_hook]}
                h_sae, captured = lm.spliced_run(
                    tokens, {hook: self._replacement(hook, records) for hook in self.hooks},
                    capture_hooks=list(self.downstream), **start)
            else:
                clean = lm.activations(tokens, self.hooks)
                for hook in self.hooks:
                    records[hook] = self._run_sae(hook, clean[hook])

        if spliced:
            with torch.autocast(self.device.type, enabled=False):
                kl, stats = losses.kl_loss(h_sae.float(), h_orig.float(), self.W_U, self.b_U,
                                           labels=losses.next_token_labels(tokens))
            metrics.update(kl=kl.detach(), ce_orig=stats.ce_orig, ce_sae=stats.ce_sae,
                           ce_increase=stats.ce_sae - stats.ce_orig, top1_agreement=stats.top1_agreement)
            if coeffs.kl_coeff:
                terms["kl"] = coeffs.kl_coeff * kl
            if self.downstream:
                ds_total, per_hook = losses.downstream_loss(captured, clean, self.downstream)
                terms["downstream"] = ds_total
                metrics.update({f"downstream_mse/{h}": v for h, v in per_hook.items()})

        fired = {}
        for hook in self.hooks:
            sae = self.saes[hook]
            x, out = records[hook]
            mse = losses.mse_loss(out.reconstruction, x)
            if coeffs.sparsity_coeff:
                term = coeffs.sparsity_coeff * losses.sparsity_loss(out.code, sae.d_in, coeffs.sparsity_p)
                terms["sparsity"] = terms["sparsity"] + term if "sparsity" in terms else term
            if coeffs.local_mse_coeff:
                term = coeffs.local_mse_coeff * mse
                terms["local_mse"] = terms["local_mse"] + term if "local_mse" in terms else term
            if train and coeffs.auxk_coeff and isinstance(out.code, SparseCode):
                dead = self.trackers[hook].dead_mask()
                term = coeffs.auxk_coeff * losses.auxk_loss(sae, x, out.reconstruction, dead, coeffs.auxk_k)
                terms["auxk"] = terms["auxk"] + term if "auxk" in terms else term
            metrics[f"l0/{hook}"] = losses.l0(out.code)
            metrics[f"mse/{hook}"] = mse.detach()
            metrics[f"explained_variance/{hook}"] = losses.explained_variance(x, out.reconstruction)
            fired[hook] = losses.fired_latents(out.code, sae.n_latents)
        metrics["l0"] = torch.stack([metrics[f"l0/{h}"] for h in self.hooks]).mean()

        loss = sum(terms.values())
        metrics["loss"] = loss.detach()
        metrics.update({f"loss/{name}": term.detach() for name, term in terms.items()})
        return loss, metrics, fired

    # ------------------------------------------------------------------ one optimizer step

    def step(self, tokens: torch.Tensor) -> dict[str, float]:
        """One optimizer step on tokens [batch, ctx] (split into optim.grad_accum micro-batches).

        Returns the step's metrics as floats (see fastsae.train.metrics for the names).
        """
        cfg = self.config
        n_micro = cfg.optim.grad_accum
        if tokens.ndim != 2 or tokens.shape[0] % n_micro:
            raise ValueError(f"tokens must be [batch, ctx] with batch divisible by optim.grad_accum={n_micro}, "
                             f"got shape {tuple(tokens.shape)}")
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        fired_per_micro = []
        for micro in tokens.chunk(n_micro):
            loss, metrics, fired = self._forward(micro, train=True)
            (loss / n_micro).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value / n_micro
            fired_per_micro.append((fired, micro.numel()))

        for sae in self.saes.values():
            if sae.decoder_norm == "project":
                sae.remove_decoder_parallel_grad_()
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # From here to the end of the update the state is in flux: an interrupt inside it cannot
        # be checkpointed (fit() then keeps the previous checkpoint).
        self._updating = True
        for fired, n_tokens in fired_per_micro:  # dead latents, counted per micro-batch
            for hook, mask in fired.items():
                self.trackers[hook].update(mask, n_tokens)
        self.optimizer.step()
        self.scheduler.step()
        for sae in self.saes.values():
            if sae.decoder_norm == "project":
                sae.project_decoder_()
        self.step_count += 1
        self.tokens_seen += tokens.numel()
        self._resume_point = None  # the step is complete: checkpoints take the current state
        self._updating = False

        out = {key: float(value) for key, value in totals.items()}
        out.update(grad_norm=float(grad_norm), lr=lr, step=self.step_count, tokens=self.tokens_seen,
                   tokens_per_s=tokens.numel() / (time.perf_counter() - start))
        for hook, tracker in self.trackers.items():
            out[f"dead/{hook}"] = tracker.n_dead()
            out[f"alive/{hook}"] = self.saes[hook].n_latents - out[f"dead/{hook}"]
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, n_tokens: int | None = None) -> dict[str, float]:
        """The eval pass on held-out data: metrics of the spliced model, as "eval/<name>"."""
        cfg = self.config
        n_tokens = n_tokens or cfg.eval.n_tokens
        own_stream = self.eval_dataset is None  # built fresh here: it starts at the held-out data's start
        if own_stream:
            batches = iter(self._build_stream("eval", cfg.eval.batch_size))
        else:
            batches = iter(self.eval_dataset)
        for sae in self.saes.values():
            sae.eval()
        sums: dict[str, float] = {}
        fired = {hook: torch.zeros(sae.n_latents, dtype=torch.bool, device=self.device)
                 for hook, sae in self.saes.items()}
        seen = 0
        while seen < n_tokens:
            try:
                tokens = next(batches)
            except StopIteration:
                break
            # Token streams loop forever: a batch drawn after the held-out data wrapped around
            # would count tokens twice, so the pass ends at the first one.
            if own_stream and batches.epoch > 0:
                warnings.warn(f"the held-out data ran out after {seen} tokens (eval asked for {n_tokens}); "
                              "each held-out token was evaluated once", stacklevel=2)
                break
            _, metrics, batch_fired = self._forward(tokens, train=False)
            n = tokens.numel()
            for key, value in metrics.items():  # token-weighted means over the eval set
                sums[key] = sums.get(key, 0.0) + float(value) * n
            for hook, mask in batch_fired.items():
                fired[hook] |= mask
            seen += n
        for sae in self.saes.values():
            sae.train()
        if seen == 0:
            raise RuntimeError("the eval data yielded no full batch: it holds fewer than eval.batch_size x "
                               "data.context_length tokens")
        out = {f"eval/{key}": value / seen for key, value in sums.items()}
        for hook, mask in fired.items():
            out[f"eval/alive/{hook}"] = int(mask.sum())
        out["eval/tokens"] = seen
        return out

    # ------------------------------------------------------------------ state, checkpoints

    def _train_batches(self):
        """An endless iterator of training batches (a finite dataset is cycled, with a warning)."""
        cfg = self.config
        while True:
            if self.dataset is None:
                self.dataset = self._build_stream("train", cfg.optim.batch_size)
            iterator = iter(self.dataset)
            if not hasattr(self.dataset, "state_dict"):
                for _ in range(self._batches_consumed):  # resume a plain iterable by skipping
                    next(iterator)
            produced = False
            for batch in iterator:
                produced = True
                if not hasattr(self.dataset, "state_dict"):
                    self._batches_consumed += 1
                yield batch
            if not produced:
                raise RuntimeError("the training data yielded no batches")
            warnings.warn("the training data ran out; starting it again from the beginning", stacklevel=2)
            self._batches_consumed = 0

    def _data_state(self):
        if self.dataset is not None and hasattr(self.dataset, "state_dict"):
            return self.dataset.state_dict()
        return None

    @staticmethod
    def _rng_state() -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _set_rng_state(state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def state_dict(self) -> dict:
        """Everything but the SAE weights that an exact resume needs."""
        data, rng, consumed = self._data_state(), self._rng_state(), self._batches_consumed
        if self._resume_point is not None:  # interrupted mid-step: the state before its batch
            data, rng, consumed = self._resume_point
        return {
            "step": self.step_count,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": data,
            "batches_consumed": consumed,
            "rng": rng,
            "trackers": {hook: t.state_dict() for hook, t in self.trackers.items()},
            "wandb_id": self._wandb_id,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._batches_consumed = state["batches_consumed"]
        if state["data"] is not None:
            if self.dataset is None:
                self.dataset = self._build_stream("train", self.config.optim.batch_size)
            self.dataset.load_state_dict(state["data"])
        self._set_rng_state(state["rng"])
        for hook, tracker_state in state["trackers"].items():
            self.trackers[hook].load_state_dict(tracker_state)
        self._wandb_id = state.get("wandb_id")

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.step_count, self.saes, self.state_dict(),
                                    keep=self.config.checkpoint.keep)

    def load_checkpoint(self, path: str | Path | None = None) -> Path:
        """Restore the SAEs and trainer state from a checkpoint (default: this run's latest)."""
        path = Path(path) if path is not None else ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"{self.run_dir} has no complete checkpoint to resume from")
        saes, state = ckpt.load_checkpoint(path, device=self.device)
        if sorted(saes) != sorted(self.saes):
            raise ValueError(f"checkpoint {path} has SAEs for {sorted(saes)}, the config for {sorted(self.saes)}")
        with torch.no_grad():
            for hook, sae in saes.items():
                for name, param in self.saes[hook].named_parameters():
                    param.copy_(getattr(sae, name))
        self.load_state_dict(state)
        truncate_metrics(self.run_dir, self.step_count)
        return path

    @classmethod
    def from_run_dir(cls, run_dir, model=None, dataset=None, *, eval_dataset=None,
                     overrides: list[str] | None = None) -> "Trainer":
        """A trainer for an existing run, restored from its latest checkpoint (for --resume)."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        config = load_config(config_path, overrides)
        trainer = cls(config, model, dataset, eval_dataset=eval_dataset, run_dir=run_dir)
        trainer.load_checkpoint()
        return trainer

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        print(f"\nfastsae: got {signal.Signals(signum).name}; finishing this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", flush=True)

    def fit(self, max_steps: int | None = None) -> dict[str, float]:
        """Train to config.optim.n_tokens (or for max_steps more steps), with logging, evals and
        checkpoints; returns the last step's metrics merged with the final eval's.

        Ctrl-C or SIGTERM: the step in progress finishes, a checkpoint is saved, then
        KeyboardInterrupt is raised. `Trainer.from_run_dir(run_dir).fit()` continues exactly.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        logger = MetricsLogger(self.run_dir, cfg.wandb, cfg.to_dict(), cfg.name, self._wandb_id)
        self._wandb_id = logger.wandb_id
        batches = self._batches = self._batches or self._train_batches()
        total = cfg.total_steps
        stop_at = total if max_steps is None else min(total, self.step_count + max_steps)
        bar = tqdm(total=cfg.optim.n_tokens, initial=min(self.tokens_seen, cfg.optim.n_tokens), unit="tok",
                   unit_scale=True, disable=not cfg.log.progress, dynamic_ncols=True)
        handlers = self._install_signal_handlers()
        metrics: dict[str, float] = {}
        try:
            while self.step_count < stop_at:
                self._resume_point = (self._data_state(), self._rng_state(), self._batches_consumed)
                tokens = next(batches)
                metrics = self.step(tokens)
                bar.update(min(tokens.numel(), cfg.optim.n_tokens - bar.n))
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}",
                                tok_s=f"{metrics['tokens_per_s']:.3g}", refresh=False)
                step = self.step_count
                if step % cfg.log.every == 0 or step == total:
                    logger.log(metrics, step)
                if cfg.eval.every and step % cfg.eval.every == 0 and step < total:
                    evaluation = self.evaluate()
                    logger.log(evaluation, step)
                    bar.write(f"eval at step {step}: " + ", ".join(
                        f"{k.removeprefix('eval/')}={v:.4g}" for k, v in evaluation.items() if "/" not in k[5:]))
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total:
                    self.save_checkpoint()
                if self._stop_signal is not None:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if self._updating:  # torn parameters: keep the last checkpoint instead
                print("fastsae: interrupted inside the optimizer update; the last checkpoint is kept", flush=True)
            else:
                path = self.save_checkpoint()
                print(f"fastsae: interrupted at step {self.step_count}; saved {path}. Resume with "
                      f"`fastsae train --resume {self.run_dir}`", flush=True)
            logger.close()
            raise
        finally:
            self._restore_signal_handlers(handlers)
            self._stop_signal = None
            bar.close()

        try:
            if self.step_count >= total:
                evaluation = self.evaluate()
                logger.log(evaluation, self.step_count)
                metrics = {**metrics, **evaluation}
            self.save_checkpoint()
        finally:
            logger.close()
        return metrics

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None  # signals only reach the main thread
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(handlers) -> None:
        for sig, handler in (handlers or {}).items():
            signal.signal(sig, handler)


def summarize(metrics: dict, hooks: list[str], prefix: str = "") -> str:
    """The headline metrics as a console table: the global ones, then each SAE's."""
    keys = [prefix + k for k in SUMMARY_KEYS]
    for hook in hooks:
        keys += [f"{prefix}{name}/{hook}" for name in ("l0", "explained_variance", "mse", "alive")]
    keys += [k for k in metrics if k.startswith(prefix + "downstream_mse/")]
    return format_metrics(metrics, keys)
