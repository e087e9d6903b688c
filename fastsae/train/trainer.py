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

Then: gradient clipping on the SAE parameters, Adam (torch's fused one on CUDA), the LR schedule
(linear warmup by samples, cosine to min_lr_factor), and for decoder_norm="project" the
parallel-gradient removal before the step and the row projection after it. The LM is frozen: no
gradient, not in the optimizer. On CUDA nothing in a step waits for the GPU: metrics stay on the
device until a logging step reads them (step_async / read_metrics).
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
from typing import NamedTuple

import numpy as np
import torch

from fastsae import distributed
from fastsae.sae import E2ESAE, SparseCode
from fastsae.train import checkpoint as ckpt
from fastsae.train import losses
from fastsae.train.config import ConfigError, TrainConfig, load_config
from fastsae.train.data import TokenStream
from fastsae.train.metrics import (DeadLatentTracker, MetricsLogger, format_metrics, truncate_metrics,
                                   write_eval_json)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The metrics printed at the end of fit() and by `fastsae eval`, in this order (then per SAE).
SUMMARY_KEYS = ["kl", "ce_orig", "ce_sae", "ce_increase", "top1_agreement", "l0"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":  # a config error here, not a raw CUDA traceback at the first tensor
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available (torch {torch.__version__}, "
                              f"{'a CPU build' if torch.version.cuda is None else 'no GPU visible'}); "
                              "set device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """The paper code's schedule (e2e_sae.utils.get_cosine_schedule_with_warmup): linear warmup
    from 0 (step 0 has factor 0, so the first update does not move the SAE), then cosine decay
    from 1 to min_factor at total_steps, never below min_factor.

    The paper's code passes warmup_samples // batch_size and n_samples // batch_size (both
    rounded down), so a last partial batch runs just past total_steps, as there.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(min_factor, min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


class PendingMetrics(NamedTuple):
    """One step's metrics before they are read (Trainer.step_async): device scalars and host values."""

    values: dict  # name -> 0-d tensor on the training device (loss terms, kl, l0, grad_norm, ...)
    dead: dict  # hook -> 0-d tensor: latents of that SAE that did not fire in the dead window
    lr: float
    step: int
    tokens: int


def _local_latents(sae: E2ESAE) -> int:
    """The latents this process holds of an SAE: all of them, or a ShardedE2ESAE's block."""
    return getattr(sae, "n_local", sae.n_latents)


class _SilentLogger:
    """The metrics logger of ranks other than 0 in a distributed run: rank 0 writes metrics.jsonl."""

    wandb_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Trains the SAEs of `config` (a TrainConfig, a preset name / YAML path, or a dict).

    model: a fastsae LanguageModel, a TransformerLens model (HookedTransformer or
        TransformerBridge), a name or directory, or None to load config.model.name.
    dataset: a TokenStream, any iterable of LongTensor [batch, ctx] batches (re-iterable for
        exact resume), or None to build one from config.data.
    eval_dataset: the same for the eval pass; None builds the eval split from config.data.
    saes: optional {hook: E2ESAE or path} to start from instead of fresh ones; a path is anything
        E2ESAE.from_pretrained(path, hook=hook) reads (fastsae, SAELens, sparsify, e2e_sae, a run).
    """

    def __init__(self, config, model=None, dataset=None, *, eval_dataset=None, run_dir=None,
                 saes: dict[str, E2ESAE] | None = None, overwrite: bool = False):
        if not isinstance(config, TrainConfig):
            config = load_config(config)
        self.config = cfg = config
        # Under torchrun: this process's place in data groups x shards (see fastsae.distributed);
        # one process otherwise. Every data rank reads the whole global batch and keeps its rows.
        try:
            self.layout = distributed.setup(cfg.saes.shards)
        except ValueError as error:
            raise ConfigError(f"config: {error}") from None
        if cfg.optim.batch_size % (self.layout.data_size * cfg.optim.grad_accum):
            raise ConfigError(f"config: optim.batch_size={cfg.optim.batch_size} must be divisible by the data "
                              f"ranks ({self.layout.data_size} = {self.layout.world_size} processes / saes.shards="
                              f"{self.layout.shards}) x optim.grad_accum ({cfg.optim.grad_accum})")
        self.device = resolve_device(cfg.device)
        if self.layout.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
        self.lm = self._language_model(model)
        # The KL and CE never build logits: refuse a model whose logits that path cannot reproduce.
        self.lm.check_logit_free_path()
        self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
        if self.device.type == "cuda":
            # Process-wide, like torch's own switch: cuBLAS and fastsae's kernels (through
            # fastsae.kernels._common.matmul_mode) both read it. CPU runs keep torch's setting.
            torch.set_float32_matmul_precision(cfg.matmul_precision)

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
        sharded = self.layout.shards > 1  # each rank keeps its block of every SAE's latents
        if sharded and cfg.saes.activation == "topk" and cfg.loss.auxk_coeff:
            raise ConfigError("config: loss.auxk_coeff: AuxK is not implemented for sharded SAEs "
                              "(saes.shards > 1); set loss.auxk_coeff=0")
        if saes is None:
            torch.manual_seed(cfg.seed)
            n_latents = cfg.saes.n_latents or int(round(cfg.saes.ratio * self.lm.d_model))
            spec = dict(decoder_norm=cfg.saes.decoder_norm, init=None if cfg.saes.init == "auto" else cfg.saes.init,
                        init_encoder_as_decoder_transpose=cfg.saes.init_encoder_as_decoder_transpose, dtype=sae_dtype)
            shape = (self.lm.d_model, n_latents, cfg.saes.activation, cfg.saes.k)
            saes = {}
            for hook in self.hooks:
                metadata = {"hook": hook, "model": cfg.model.name, "run": cfg.name}
                if not sharded:
                    saes[hook] = E2ESAE(*shape, metadata=metadata, device=self.device, **spec)
                    continue
                try:  # this rank's block of the whole init, drawn without the whole dictionary
                    saes[hook] = distributed.ShardedE2ESAE.drawn(self.layout, *shape, metadata=metadata,
                                                                 device=self.device, **spec)
                except ValueError as error:
                    raise ConfigError(f"config: saes.shards: {error}") from None
        if sorted(saes) != sorted(self.hooks):
            raise ValueError(f"saes must have one SAE per hook in config.saes.hooks {self.hooks}, got {sorted(saes)}")
        # A path (a released SAE in any format E2ESAE.from_pretrained reads) is loaded for its hook.
        saes = {hook: E2ESAE.from_pretrained(sae, hook=hook) if isinstance(sae, (str, Path)) else sae
                for hook, sae in saes.items()}
        for hook, sae in saes.items():
            if sae.d_in != self.lm.d_model:
                raise ValueError(f"saes[{hook!r}] reads d_in={sae.d_in} but the model's d_model is {self.lm.d_model}")
        if sharded:  # whole SAEs given by the caller: each rank keeps its block
            try:
                saes = {hook: sae if isinstance(sae, distributed.ShardedE2ESAE)
                        else distributed.ShardedE2ESAE.from_full(sae, self.layout) for hook, sae in saes.items()}
            except ValueError as error:
                raise ConfigError(f"config: saes.shards: {error}") from None
        self.saes = {hook: saes[hook].to(self.device) for hook in self.hooks}
        self.params = [p for hook in self.hooks for p in self.saes[hook].parameters()]

        # On CUDA, torch's fused Adam: one kernel for all parameters instead of several per tensor.
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                          fused=True if self.device.type == "cuda" else None)
        # the schedule's length is n_samples // batch_size as in the paper's code (total_steps,
        # the steps run, rounds up)
        warmup, floor = cfg.warmup_steps, cfg.optim.min_lr_factor
        total = max(1, cfg.optim.n_tokens // cfg.tokens_per_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, total, floor))
        self.trackers = {hook: DeadLatentTracker(_local_latents(sae), cfg.log.dead_window_tokens, self.device)
                         for hook, sae in self.saes.items()}

        # W_U for the KL in fp32 (a copy only when the LM is not fp32): the op's math is fp32, and
        # rounding both hidden states to bf16 would add noise of the size of a small KL.
        self.W_U = self.lm.W_U.detach().float()
        self.b_U = None if self.lm.b_U is None else self.lm.b_U.detach().float()

        self.dataset = None if dataset is None else self._adapt_data(dataset, cfg.optim.batch_size, "dataset")
        self.eval_dataset = eval_dataset  # adapted at each evaluate(), which reads it from its start
        # a TokenStream given as eval data: every eval restarts it where it stood when given
        self._eval_start = eval_dataset.state_dict() if isinstance(eval_dataset, TokenStream) else None
        self.run_dir = Path(run_dir or cfg.run_dir or
                            Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self.overwrite = overwrite  # fit() may move an old run in run_dir aside (see ckpt.claim_run_dir)
        self._resumed = False  # restored from a checkpoint of run_dir: its files are this run's
        self._claimed = False  # run_dir checked and config.yaml written by an earlier fit()
        self._new_overrides: list[str] = []  # --set overrides of this resume, for overrides.yaml
        self.step_count = 0
        self.tokens_seen = 0
        self._unread_tokens, self._unread_seconds = 0, 0.0  # steps since the last read_metrics()
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
                                  batch_size=batch_size, split=split, seed=cfg.seed, vocab_size=self.lm.d_vocab)

    def _adapt_data(self, data, batch_size: int, name: str):
        """A user's dataset / eval_dataset as token batches (see fastsae.train.data.as_token_stream)."""
        from fastsae.train.data import as_token_stream

        cfg = self.config
        return as_token_stream(data, self.lm.tokenizer, context_length=cfg.data.context_length, batch_size=batch_size,
                               seed=cfg.seed, vocab_size=self.lm.d_vocab, prepend_bos=cfg.data.prepend_bos, name=name,
                               exact_batches=name == "dataset")

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

    def _forward(self, tokens: torch.Tensor, *, train: bool, recon_hooks: tuple[str, ...] = ()):
        """Loss (differentiable) and detached metrics of one batch, plus the latents that fired.

        recon_hooks (eval): later hooks where the spliced run's activations are compared with the
        clean run's (downstream_mse/<hook>, downstream_explained_variance/<hook>).
        """
        cfg, lm = self.config, self.lm
        coeffs = cfg.loss
        tokens = tokens.to(lm.device, torch.long)
        records: dict[str, tuple[torch.Tensor, object]] = {}
        metrics: dict[str, torch.Tensor] = {}
        terms: dict[str, torch.Tensor] = {}
        spliced = cfg.is_e2e or not train  # eval always measures the spliced model

        with self._autocast():
            if spliced:
                watched = list(dict.fromkeys([*self.downstream, *recon_hooks]))  # loss hooks first
                cache_hooks = [h for h in [self.start_hook, *watched] if h is not None]
                h_orig, clean = lm.clean_run(tokens, cache_hooks)
                start = {} if self.start_hook is None else {"start_hook": self.start_hook,
                                                             "start_acts": clean[self.start_hook]}
                h_sae, captured = lm.spliced_run(
                    tokens, {hook: self._replacement(hook, records) for hook in self.hooks},
                    capture_hooks=watched, **start)
            else:
                clean = lm.activations(tokens, self.hooks)
                for hook in self.hooks:
                    records[hook] = self._run_sae(hook, clean[hook])

        if spliced:
            with torch.autocast(self.device.type, enabled=False):
                kl, stats = losses.kl_loss(h_sae.float(), h_orig.float(), self.W_U, self.b_U,
                                           labels=losses.next_token_labels(tokens), softcap=self.lm.logit_softcap)
            metrics.update(kl=kl.detach(), ce_orig=stats.ce_orig, ce_sae=stats.ce_sae,
                           ce_increase=stats.ce_sae - stats.ce_orig, top1_agreement=stats.top1_agreement)
            if coeffs.kl_coeff:
                terms["kl"] = coeffs.kl_coeff * kl
            if self.downstream:
                ds_total, per_hook = losses.downstream_loss(captured, clean, self.downstream)
                terms["downstream"] = ds_total
                metrics.update({f"downstream_mse/{h}": v for h, v in per_hook.items()})
            for hook in recon_hooks:
                metrics[f"downstream_mse/{hook}"] = losses.mse_loss(captured[hook], clean[hook]).detach()
                metrics[f"downstream_explained_variance/{hook}"] = losses.explained_variance(
                    clean[hook], captured[hook])

        fired = {}
        for hook in self.hooks:
            sae = self.saes[hook]
            x, out = records[hook]
            mse = losses.mse_loss(out.reconstruction, x)
            if coeffs.sparsity_coeff:
                term = coeffs.sparsity_coeff * (
                    sae.sparsity_loss(out.code, coeffs.sparsity_p) if self.layout.shards > 1
                    else losses.sparsity_loss(out.code, sae.d_in, coeffs.sparsity_p))
                terms["sparsity"] = terms["sparsity"] + term if "sparsity" in terms else term
            if coeffs.local_mse_coeff:
                term = coeffs.local_mse_coeff * mse
                terms["local_mse"] = terms["local_mse"] + term if "local_mse" in terms else term
            if train and coeffs.auxk_coeff and isinstance(out.code, SparseCode):
                dead = self.trackers[hook].dead_mask()
                term = coeffs.auxk_coeff * losses.auxk_loss(sae, x, out.reconstruction, dead, coeffs.auxk_k)
                terms["auxk"] = terms["auxk"] + term if "auxk" in terms else term
            metrics[f"l0/{hook}"] = sae.l0(out.code) if self.layout.shards > 1 else losses.l0(out.code)
            metrics[f"mse/{hook}"] = mse.detach()
            metrics[f"explained_variance/{hook}"] = losses.explained_variance(x, out.reconstruction)
            fired[hook] = (sae.fired_latents(out.code) if self.layout.shards > 1  # this shard's latents
                           else losses.fired_latents(out.code, sae.n_latents))
        metrics["l0"] = torch.stack([metrics[f"l0/{h}"] for h in self.hooks]).mean()

        loss = sum(terms.values())
        metrics["loss"] = loss.detach()
        metrics.update({f"loss/{name}": term.detach() for name, term in terms.items()})
        return loss, metrics, fired

    # ------------------------------------------------------------------ one optimizer step

    def step(self, tokens: torch.Tensor) -> dict[str, float]:
        """One optimizer step on tokens [batch, ctx] (split into optim.grad_accum micro-batches).

        Returns the step's metrics as floats (see fastsae.train.metrics for the names). Reading
        them waits for the device; fit() uses step_async() and reads metrics on logging steps only.
        """
        return self.read_metrics(self.step_async(tokens))

    def step_async(self, tokens: torch.Tensor) -> PendingMetrics:
        """step() without reading its metrics: they stay tensors on the device, and nothing in the
        step waits for it (on CUDA the work is queued and this returns). read_metrics() gives the
        floats step() returns."""
        cfg = self.config
        n_micro = cfg.optim.grad_accum
        if tokens.ndim != 2 or tokens.shape[0] % (n_micro * self.layout.data_size):
            raise ValueError(f"tokens must be [batch, ctx] with batch divisible by optim.grad_accum={n_micro} "
                             f"x {self.layout.data_size} data ranks, got shape {tuple(tokens.shape)}")
        n_tokens = tokens.numel()  # the global batch (every data rank reads it)
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        fired_per_micro = []
        for micro in tokens.chunk(n_micro):
            # data parallel: this rank's rows of each micro-batch, so that the ranks together see
            # the micro-batches of a one-process run (the dead-latent windows count the same)
            micro = micro.chunk(self.layout.data_size)[self.layout.data_rank]
            loss, metrics, fired = self._forward(micro, train=True)
            (loss / n_micro).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value / n_micro
            fired_per_micro.append((fired, micro.numel()))
        # data parallel: the mean gradient and metrics of the global batch on every rank
        distributed.average_gradients(self.saes.values(), self.layout)
        totals = distributed.mean_over_data(totals, self.layout)

        for sae in self.saes.values():
            if sae.decoder_norm == "project":
                sae.remove_decoder_parallel_grad_()
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
        if self.layout.shards > 1:  # the norm of the whole SAEs, summed over their shards
            grad_norm = distributed.clip_grad_norm_(self.saes.values(), max_norm, self.layout)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # From here to the end of the update the state is in flux: an interrupt inside it cannot
        # be checkpointed (fit() then keeps the previous checkpoint).
        self._updating = True
        for fired, micro_tokens in fired_per_micro:  # dead latents, counted per micro-batch (of all data ranks)
            for hook, mask in fired.items():
                self.trackers[hook].update(distributed.any_across(mask, self.layout.data_group),
                                           micro_tokens * self.layout.data_size)
        self.optimizer.step()
        self.scheduler.step()
        for sae in self.saes.values():
            if sae.decoder_norm == "project":
                sae.project_decoder_()
        self.step_count += 1
        self.tokens_seen += n_tokens
        self._resume_point = None  # the step is complete: checkpoints take the current state
        self._updating = False

        dead = {hook: distributed.sum_over_shards(tracker.dead_mask().sum(), self.layout)
                for hook, tracker in self.trackers.items()}
        self._unread_tokens += n_tokens
        self._unread_seconds += time.perf_counter() - start
        return PendingMetrics(dict(totals, grad_norm=grad_norm), dead, lr=lr, step=self.step_count,
                              tokens=self.tokens_seen)

    def read_metrics(self, pending: PendingMetrics) -> dict[str, float]:
        """The floats of a step_async() result, read from the device in one transfer.

        tokens_per_s: the tokens of the steps since the previous read over their time, including
        the wait here for the work they queued (on CUDA one step's own time means nothing: it
        returns before the device finishes).
        """
        start = time.perf_counter()
        keys = list(pending.values)
        scalars = [torch.as_tensor(pending.values[key]).detach().float().reshape(()) for key in keys]
        scalars += [count.float().reshape(()) for count in pending.dead.values()]
        floats = torch.stack(scalars).tolist() if scalars else []
        out = dict(zip(keys, floats))
        seconds = self._unread_seconds + time.perf_counter() - start
        out.update(lr=pending.lr, step=pending.step, tokens=pending.tokens,
                   tokens_per_s=self._unread_tokens / seconds if seconds > 0 else float("nan"))
        self._unread_tokens, self._unread_seconds = 0, 0.0
        for hook, n_dead in zip(pending.dead, floats[len(keys):]):
            out[f"dead/{hook}"] = int(n_dead)
            out[f"alive/{hook}"] = self.saes[hook].n_latents - int(n_dead)
        return out

    # ------------------------------------------------------------------ evaluation

    def reconstruction_hooks(self) -> list[str]:
        """The hooks where eval compares the spliced run with the clean one, as the paper's eval:
        blocks.L.hook_resid_pre for every block L after the first SAE's block, and the final
        residual (the last block's hook_resid_post, before ln_final); SAE hooks excluded."""
        n_layers = self.lm.n_layers
        first = max(self.lm.block_index(self.hooks[0]), -1)
        hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(first + 1, n_layers)]
        hooks.append(f"blocks.{n_layers - 1}.hook_resid_post")
        return [hook for hook in hooks if hook not in self.hooks]

    @torch.no_grad()
    def evaluate(self, n_tokens: int | None = None, *, write: bool = True) -> dict[str, float]:
        """The eval pass on held-out data: metrics of the spliced model, as "eval/<name>".

        Besides the training metrics: downstream_mse/<hook> and downstream_explained_variance/<hook>
        at every reconstruction_hooks() hook, and alive/<hook>, the latents that fired on the eval
        tokens. With write=True and an existing run directory the result is also written to
        RUN_DIR/eval.json (atomically; see metrics.write_eval_json).
        """
        cfg = self.config
        recon_hooks = tuple(self.reconstruction_hooks())
        n_tokens = n_tokens or cfg.eval.n_tokens
        own_stream = self.eval_dataset is None  # built fresh here: it starts at the held-out data's start
        if own_stream:
            batches = iter(self._build_stream("eval", cfg.eval.batch_size))
        else:
            batches = iter(self._adapt_data(self.eval_dataset, cfg.eval.batch_size, "eval_dataset"))
            if self._eval_start is not None:
                batches.load_state_dict(self._eval_start)
            # a datasets.Dataset becomes a stream built here, from its start, that loops like ours
            own_stream = hasattr(batches, "epoch")
        start_epoch = batches.epoch if own_stream else 0
        for sae in self.saes.values():
            sae.eval()
        sums: dict[str, float] = {}
        fired = {hook: torch.zeros(_local_latents(sae), dtype=torch.bool, device=self.device)
                 for hook, sae in self.saes.items()}
        seen = 0
        while seen < n_tokens:
            try:
                tokens = next(batches)
            except StopIteration:
                break
            # Token streams loop forever: a batch drawn after the held-out data wrapped around
            # would count tokens twice, so the pass ends at the first one.
            if own_stream and batches.epoch > start_epoch:
                warnings.warn(f"the held-out data ran out after {seen} tokens (eval asked for {n_tokens}); "
                              "each held-out token was evaluated once", stacklevel=2)
                break
            _, metrics, batch_fired = self._forward(tokens, train=False, recon_hooks=recon_hooks)
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
            out[f"eval/alive/{hook}"] = int(distributed.sum_over_shards(mask.sum(), self.layout))
        out["eval/tokens"] = seen
        if write and self.layout.is_main and self.run_dir.is_dir():
            write_eval_json(self.run_dir, out, self.config.to_dict(), step=self.step_count,
                            training_tokens=self.tokens_seen,
                            n_latents=sum(sae.n_latents for sae in self.saes.values()))
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
            # sharded SAEs: Adam's moments and the dead-latent counters gathered to whole-SAE shapes
            # (on rank 0), so the checkpoint is the same as an unsharded run's and resumes on any layout
            "optimizer": distributed.gather_optimizer_state(self.optimizer, self._param_names(), self.layout),
            "scheduler": self.scheduler.state_dict(),
            "data": data,
            "batches_consumed": consumed,
            "rng": rng,
            # collective under torchrun: every rank's RNG states, and the layout they belong to
            "rng_per_rank": distributed.gather_objects(rng, self.layout),
            "world_size": self.layout.world_size,
            "trackers": {hook: {**t.state_dict(), "since_fired": distributed.gather_latents(
                             t.since_fired, 0, self.layout.shard_group)} for hook, t in self.trackers.items()},
            "wandb_id": self._wandb_id,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step"]
        self.tokens_seen = state["tokens_seen"]
        optimizer_state = state["optimizer"]
        if self.layout.shards > 1:  # the checkpoint holds whole-SAE moments: keep this shard's block
            owners = [sae for hook in self.hooks for sae in [self.saes[hook]] for _ in sae.parameters()]
            optimizer_state = distributed.shard_optimizer_state(optimizer_state, self._param_names(), owners)
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state["scheduler"])
        # The config's lr and betas win over the checkpoint's, so a resume can change them (--set
        # optim.lr=...): the schedule scales the new lr by the same factor at the same step.
        optim = self.config.optim
        self.scheduler.base_lrs = [optim.lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=optim.lr, lr=optim.lr * factor, betas=tuple(optim.betas))
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self._batches_consumed = state["batches_consumed"]
        if state["data"] is not None:
            if self.dataset is None:
                self.dataset = self._build_stream("train", self.config.optim.batch_size)
            self.dataset.load_state_dict(state["data"])
        # Each rank resumes its own RNG. Every data rank reads the same global batches and keeps its
        # rows, so a run also resumes exactly on another number of ranks; the ranks then take
        # rank 0's RNG (training draws nothing per rank).
        per_rank = state.get("rng_per_rank")
        same_layout = per_rank is not None and len(per_rank) == self.layout.world_size
        self._set_rng_state(per_rank[self.layout.rank] if same_layout else state["rng"])
        for hook, tracker_state in state["trackers"].items():
            if self.layout.shards > 1:
                since = self.saes[hook].local_block(tracker_state["since_fired"], "b_enc")
                tracker_state = {**tracker_state, "since_fired": since}
            self.trackers[hook].load_state_dict(tracker_state)
        self._wandb_id = state.get("wandb_id")

    def _param_names(self) -> list[str]:
        """The parameter name (W_enc, b_enc, W_dec, b_dec) of each optimizer parameter, in order."""
        return [name for hook in self.hooks for name, _ in self.saes[hook].named_parameters()]

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the run (from rank 0; collective under torchrun, and every rank
        waits until it is on disk). Returns its path (None on the other ranks)."""
        state = self.state_dict()
        saes = self.saes
        if self.layout.shards > 1:  # the whole SAEs, gathered on rank 0
            saes = {hook: sae.gather() for hook, sae in self.saes.items()}
        path = None
        if self.layout.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.step_count, saes, state,
                                        keep=self.config.checkpoint.keep)
        distributed.barrier(self.layout)
        return path

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
                    whole = getattr(sae, name)
                    param.copy_(self.saes[hook].local_block(whole, name) if self.layout.shards > 1 else whole)
        self.load_state_dict(state)
        # a checkpoint of this run directory: fit() continues the run in it (and, once it holds the
        # directory's lock, drops the metrics logged after this checkpoint)
        self._resumed = path.resolve().is_relative_to((self.run_dir / ckpt.CHECKPOINTS).resolve())
        return path

    @classmethod
    def from_run_dir(cls, run_dir, model=None, dataset=None, *, eval_dataset=None,
                     overrides: list[str] | None = None) -> "Trainer":
        """A trainer for an existing run, restored from its latest checkpoint (for --resume).

        The config is the run's config.yaml with the overrides of its earlier resumes and then
        `overrides`; fit() records these in RUN_DIR/overrides.yaml and leaves config.yaml as it is.
        """
        run_dir = Path(run_dir)
        config = ckpt.load_run_config(run_dir, overrides)
        trainer = cls(config, model, dataset, eval_dataset=eval_dataset, run_dir=run_dir)
        trainer.load_checkpoint()
        trainer._new_overrides = list(overrides or [])
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

        The run directory belongs to this run while it trains (see checkpoint.claim_run_dir): a new
        run refuses one that holds another run's checkpoint unless overwrite=True.
        """
        if not self.layout.is_main:  # rank 0 owns the run directory; the others only compute
            return self._fit(max_steps)
        self._claim_run_dir()
        try:
            return self._fit(max_steps)
        finally:
            ckpt.release_run_dir(self.run_dir)

    def _claim_run_dir(self) -> None:
        """Lock the run directory; on the first fit() of a new run write config.yaml, on a resume
        record the new overrides (config.yaml keeps the config the run started with)."""
        note = ckpt.claim_run_dir(self.run_dir, resume=self._resumed or self._claimed, overwrite=self.overwrite)
        if note:
            print(f"fastsae: {note}", flush=True)
        if not self._claimed:
            try:
                if self._resumed:  # the steps after the checkpoint are trained (and logged) again
                    truncate_metrics(self.run_dir, self.step_count)
                else:
                    (self.run_dir / ckpt.CONFIG_FILE).write_text(self.config.to_yaml())
                ckpt.record_overrides(self.run_dir, self._new_overrides, self.step_count)
            except BaseException:
                ckpt.release_run_dir(self.run_dir)
                raise
            self._claimed = True

    def _fit(self, max_steps: int | None) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.config
        main = self.layout.is_main  # only rank 0 writes metrics, progress and checkpoints
        logger = (MetricsLogger(self.run_dir, cfg.wandb, cfg.to_dict(), cfg.name, self._wandb_id) if main
                  else _SilentLogger())
        self._wandb_id = logger.wandb_id
        batches = self._batches = self._batches or self._train_batches()
        total = cfg.total_steps
        stop_at = total if max_steps is None else min(total, self.step_count + max_steps)
        bar = tqdm(total=cfg.optim.n_tokens, initial=min(self.tokens_seen, cfg.optim.n_tokens), unit="tok",
                   unit_scale=True, disable=not (cfg.log.progress and main), dynamic_ncols=True)
        handlers = self._install_signal_handlers()
        metrics: dict[str, float] = {}
        last_save = time.monotonic()  # for checkpoint.every_minutes
        try:
            while self.step_count < stop_at:
                self._resume_point = (self._data_state(), self._rng_state(), self._batches_consumed)
                tokens = next(batches)
                pending = self.step_async(tokens)
                bar.update(min(tokens.numel(), cfg.optim.n_tokens - bar.n))
                step = self.step_count
                # Metrics are read (a wait for the device) on logging steps only; the others queue.
                if step % cfg.log.every == 0 or step == total or step == stop_at:
                    metrics, pending = self.read_metrics(pending), None
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}",
                                    tok_s=f"{metrics['tokens_per_s']:.3g}", refresh=False)
                if step % cfg.log.every == 0 or step == total:
                    logger.log(metrics, step)
                    if not cfg.log.progress and main:  # no bar: a plain line per record, for log files and batch jobs
                        print(log_line(metrics, step, total), flush=True)
                if cfg.eval.every and step % cfg.eval.every == 0 and step < total:
                    evaluation = self.evaluate()
                    logger.log(evaluation, step)
                    if main:
                        bar.write(f"eval at step {step}: " + ", ".join(
                            f"{k.removeprefix('eval/')}={v:.4g}" for k, v in evaluation.items() if "/" not in k[5:]))
                due = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
                late = (cfg.checkpoint.every_minutes
                        and time.monotonic() - last_save >= 60 * cfg.checkpoint.every_minutes)
                if cfg.checkpoint.every_minutes:  # clocks differ: the ranks save together or not at all
                    late = distributed.all_agree(bool(late), self.layout)
                if (due or late) and step < total:
                    self.save_checkpoint()
                    last_save = time.monotonic()
                # every rank stops at the same step, also when the signal reached only some of them
                if distributed.all_agree(self._stop_signal is not None, self.layout):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if self._updating:  # torn parameters: keep the last checkpoint instead
                print("fastsae: interrupted inside the optimizer update; the last checkpoint is kept", flush=True)
            else:
                path = self.save_checkpoint()
                if main:
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


def log_line(metrics: dict, step: int, total: int) -> str:
    """One plain console line for a logged step (what the progress bar shows, when it is off)."""
    parts = [f"step {step}/{total}", f"tokens {int(metrics['tokens']):,}"]
    for key, fmt in (("loss", ".4g"), ("kl", ".4g"), ("ce_increase", ".4g"), ("l0", ".1f"), ("lr", ".3g"),
                     ("tokens_per_s", ".3g")):
        if key in metrics:
            parts.append(f"{key} {float(metrics[key]):{fmt}}")
    return "fastsae: " + ", ".join(parts)


def summarize(metrics: dict, hooks: list[str], prefix: str = "") -> str:
    """The headline metrics as a console table: the global ones, then each SAE's."""
    keys = [prefix + k for k in SUMMARY_KEYS]
    for hook in hooks:
        keys += [f"{prefix}{name}/{hook}" for name in ("l0", "explained_variance", "mse", "alive")]
    keys += [k for k in metrics if k.startswith((prefix + "downstream_mse/", prefix + "downstream_explained_variance/"))]
    return format_metrics(metrics, keys)
