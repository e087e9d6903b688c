"""The SAE trainer: local, e2e and e2e+ds training of one or more SAEs spliced into a frozen LM.

    trainer = Trainer(load_config("embedded"))
    trainer.fit()                       # or, by hand: metrics = trainer.step(tokens)

The trainer is the loop; its rooms are: fastsae.train.setup (model, SAEs, data, optimizer from
the config), objective (one batch's forward pass and the table of loss terms), evaluator (the
held-out eval pass), state (checkpoint and exact resume) and metrics (logging).

One optimizer step: the objective's loss per micro-batch (optim.grad_accum of them), backward,
gradient clipping on the SAE parameters, Adam (torch's fused one on CUDA), the LR schedule (linear
warmup by samples, cosine to min_lr_factor), and for decoder_norm="project" the parallel-gradient
removal before the step and the row projection after it. The LM is frozen: no gradient, not in the
optimizer. On CUDA nothing in a step waits for the GPU: metrics stay on the device until a logging
step reads them (step_async / read_metrics).
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import torch

from fastsae import distributed
from fastsae.train import checkpoint as ckpt
from fastsae.train import setup
from fastsae.train.config import TrainConfig, load_config
from fastsae.train.evaluator import Evaluator
from fastsae.train.metrics import DeadLatentTracker, MetricsLogger, log_line, truncate_metrics
from fastsae.train.objective import Objective
from fastsae.train.state import Checkpointing, rng_state


class PendingMetrics(NamedTuple):
    """One step's metrics before they are read (Trainer.step_async): device scalars and host values."""

    values: dict  # name -> 0-d tensor on the training device (loss terms, kl, l0, grad_norm, ...)
    dead: dict  # hook -> 0-d tensor: latents of that SAE that did not fire in the dead window
    lr: float
    step: int
    tokens: int


class _SilentLogger:
    """The metrics logger of ranks other than 0 in a distributed run: rank 0 writes metrics.jsonl."""

    wandb_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer(Checkpointing):
    """Trains the SAEs of `config` (a TrainConfig, a preset name / YAML path, or a dict).

    model: a fastsae LanguageModel, a TransformerLens model (HookedTransformer or
        TransformerBridge), a name or directory, or None to load config.model.name.
    dataset: a TokenStream, any iterable of LongTensor [batch, ctx] batches (re-iterable for
        exact resume), or None to build one from config.data.
    eval_dataset: the same for the eval pass; None builds the eval split from config.data.
    saes: optional {hook: E2ESAE or path} to start from instead of fresh ones; a path is anything
        E2ESAE.from_pretrained(path, hook=hook) reads (fastsae, SAELens, sparsify, e2e_sae, a run),
        or a released SAE's name "RELEASE:ID" (fastsae.formats.releases).
    """

    def __init__(self, config, model=None, dataset=None, *, eval_dataset=None, run_dir=None,
                 saes: dict | None = None, overwrite: bool = False):
        if not isinstance(config, TrainConfig):
            config = load_config(config)
        self.config = cfg = config
        # Under torchrun: this process's place in data groups x shards (see fastsae.distributed);
        # one process otherwise. Every data rank reads the whole global batch and keeps its rows.
        self.layout = setup.setup_layout(cfg)
        self.device = setup.resolve_device(cfg.device)
        if self.layout.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
        self.lm, self.device = setup.load_language_model(cfg, model, self.device)
        # The KL and CE never build logits: refuse a model whose logits that path cannot reproduce.
        self.lm.check_logit_free_path()
        if self.device.type == "cuda":
            # Process-wide, like torch's own switch: cuBLAS and fastsae's kernels (through
            # fastsae.kernels._common.matmul_mode) both read it. CPU runs keep torch's setting.
            torch.set_float32_matmul_precision(cfg.matmul_precision)
        self.hooks = setup.check_hooks(cfg, self.lm)
        self.saes = setup.build_saes(cfg, self.hooks, self.lm, self.layout, self.device, saes)
        self.params = [p for hook in self.hooks for p in self.saes[hook].parameters()]
        self.optimizer, self.scheduler = setup.build_optimizer(cfg, self.params, self.device)
        self.trackers = {hook: DeadLatentTracker(sae.n_local, cfg.log.dead_window_tokens, self.device)
                         for hook, sae in self.saes.items()}
        self.objective = Objective(cfg, self.lm, self.saes, self.hooks, self.layout, self.trackers)
        self.evaluator = Evaluator(self.objective, eval_dataset)

        self.dataset = None if dataset is None else setup.adapt_data(cfg, self.lm, dataset, cfg.optim.batch_size,
                                                                     "dataset")
        self.run_dir = Path(run_dir or cfg.run_dir or
                            Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self.overwrite = overwrite  # fit() may move an old run in run_dir aside (see ckpt.claim_run_dir)
        self._resumed = False  # restored from a checkpoint of run_dir: its files are this run's
        self._claimed = False  # run_dir checked and config.yaml written by an earlier fit()
        self._new_overrides: list[str] = []  # --set overrides of this resume, for overrides.yaml
        self.step_count = 0
        self.tokens_seen = 0
        self._unread_tokens, self._unread_seconds = 0, 0.0  # steps since the last read_metrics()
        self._batches = None  # the training batches, built on first use
        self._batches_consumed = 0  # for plain iterables: how many to skip on resume
        self._resume_point = None  # data/RNG state before the batch of a step in progress
        self._updating = False  # inside optimizer.step(): an interrupt there leaves no clean state
        self._stop_signal = None
        self._wandb_id = None

    @property
    def start_hook(self) -> str | None:
        """The resid_pre hook the spliced run starts from (None: from the tokens)."""
        return self.objective.start_hook

    def _build_stream(self, split: str, batch_size: int):
        return setup.build_stream(self.config, self.lm, split, batch_size)

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
        counts_per_micro = []
        for micro in tokens.chunk(n_micro):
            # data parallel: this rank's rows of each micro-batch, so that the ranks together see
            # the micro-batches of a one-process run (the dead-latent windows count the same)
            micro = micro.chunk(self.layout.data_size)[self.layout.data_rank]
            loss, metrics, fire_counts = self.objective(micro, train=True)
            (loss / n_micro).backward()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value / n_micro
            counts_per_micro.append((fire_counts, micro.numel()))
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
        for fire_counts, micro_tokens in counts_per_micro:  # dead latents, per micro-batch (of all data ranks)
            for hook, counts in fire_counts.items():
                self.trackers[hook].update(distributed.any_across(counts > 0, self.layout.data_group),
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
        return self.evaluator.reconstruction_hooks()

    def evaluate(self, n_tokens: int | None = None, *, write: bool = True) -> dict[str, float]:
        """The eval pass on held-out data (see Evaluator.evaluate); with write=True and an existing
        run directory the result is also written to RUN_DIR/eval.json."""
        return self.evaluator.evaluate(n_tokens, run_dir=self.run_dir if write else None, step=self.step_count,
                                       training_tokens=self.tokens_seen)

    # ------------------------------------------------------------------ the training data

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
                self._resume_point = (self._data_state(), rng_state(), self._batches_consumed)
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
