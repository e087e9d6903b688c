"""`fastsae finetune`: a short KL + MSE fine-tune of trained SAEs (Karvonen 2025), measured before and after.

    fastsae finetune runs/local --model embedded                      # 5 % more tokens, embedded-finetune
    fastsae finetune sae_dir@blocks.6.hook_resid_pre --model gpt2 --fraction 0.1
    fastsae finetune sparsify_run --model gpt2 --tokens 25e6 --run-dir runs/ft
    fastsae finetune --resume runs/ft                                 # continue an interrupted one

Any SAE E2ESAE.from_pretrained reads (a fastsae run, checkpoint or SAE directory, SAELens,
sparsify, e2e_sae) of any kind (its own training pass and loss terms) is spliced into the model and
trained on KL + MSE as Karvonen, "Revisiting End-To-End Sparse Autoencoder Training: A Short
Finetune Is All You Need" (arXiv 2503.17272) does. The run is an ordinary run directory (config.yaml,
metrics.jsonl, checkpoints/) plus:

    RUN_DIR/finetune.json      the sources, the budget, the coefficients and where they came from,
                               and the held-out metrics before training (written before it starts)
    RUN_DIR/eval.json          the usual eval record (after), with "before" and "finetune" added
    RUN_DIR/finetuned/NAME/    each fine-tuned SAE in the format it came from (SAELens in, SAELens
                               out; sparsify in, sparsify out; fastsae in, fastsae out; e2e_sae has
                               no writer: fastsae's format)

Before and after are measured by the same eval pass on the same held-out tokens (the config's
eval split from its start): the CE-loss gap (ce_increase), KL, L0 and explained variance, printed
side by side.

What is followed, from the paper's code (github.com/adamkarvonen/sae_kl_finetune, utils.train_model
of its main (TopK) and relu branches) and its abstract; the paper's text was not reachable from here
(a released KL fine-tune of Gemma Scope SAEs that follows the paper states the same loss):
- The loss: every step alpha = (MSE / (KL + 1e-8)).detach() and the reconstruction part is
  (alpha * KL + MSE) / 2: the KL's weight comes from the ratio of the two losses' scales, so
  neither dominates and the sum keeps the MSE's value. Here: loss.balance="mse" (fastsae.train.
  objective.Objective.term_weights), with the MSE that of every SAE summed.
- The transfer of the sparsity coefficient: the relu branch adds the SAE's own training penalty
  (its trainer's l1_penalty, unchanged) to that sum, "so an optional sparsity penalty stays
  relevant": the reconstruction part has the scale the penalty was tuned against. Here the
  fine-tune's loss is the source run's loss with its reconstruction term replaced by the balanced
  pair at that term's scale: a local source keeps local_mse_coeff as the scale (balance "mse"), an
  e2e source its kl_coeff (balance "kl", the mirror image; the paper fine-tunes MSE SAEs only), and
  the kind's own terms (sparsity, AuxK, ...) keep the source's coefficients.
- The budget: the paper fine-tunes on "the final 25M training tokens (just a few percent of
  typical training budgets)" of SAEBench SAEs, trained on 500M (5 %; the 500M is SAEBench's budget
  as we know it, not re-read here): the default is that share of the source's
  training tokens (a fastsae run's checkpoint step, e2e_sae's n_samples x n_ctx, a SAELens cfg's
  training_tokens), else the preset's optim.n_tokens (25M for gpt2-finetune).
- Optimizer: a constant learning rate without warmup and gradient clipping at 1.0, as there. The
  paper's 5e-5 is one number for its SAEs; the rule here is inferred: the fine-tune continues at
  the learning rate the source run's schedule ended at (a fastsae or e2e_sae run: lr x
  min_lr_factor; gpt2-local's 5e-4 x 0.1 is the paper's 5e-5), else the preset's. A larger one also lowers the CE gap with MSE
  alone (more training of a run that ended unconverged), which is not the paper's effect: see the
  README's fine-tune table and its MSE-only control. The decoder rows stay unit norm (parallel
  gradient removed, rows projected) for decoder_norm "project" SAEs (SAELens, sparsify), as there;
  "forward" SAEs (fastsae's, the paper's) keep normalising in the forward pass.
What is inferred or left out:
- fastsae's MSE is a mean over elements (the paper's code: a sum over d_in): the balance makes the
  KL's weight follow it, so only the sparsity coefficient's units differ, and those come from the
  source run (SAELens's ReLU files do not record theirs: the preset's coefficient is used, and
  --set loss.sparsity_coeff=... picks another). SAEs that select k latents per token (spec k set:
  TopK, BatchTopK, ...) from files that do not record a coefficient get sparsity_coeff 0, as
  SAELens, sparsify and dictionary_learning train them.
- Not followed: AdamW's default weight decay (fastsae trains with Adam), the paper's
  activation normalisation (fastsae reads the activations as they are), and its adaptive L1
  controller (update_sparsity_penalty, defined in the code read but not called by train_model).
- A "project" SAE whose decoder rows are not unit norm (some SAELens ReLU files) has them made
  unit norm by the first step's projection, a change of function the fine-tune does not undo: a
  warning says so.
"""


from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fastsae import formats
from fastsae._files import atomic_write_text, read_json_object
from fastsae.formats.hooks import sparsify_layers_name
from fastsae.train import checkpoint as ckpt
from fastsae.train.config import ConfigError
from fastsae.train.finetune_sources import PAPER_SHARE, PRESETS, Source, finetune_config, load_source
from fastsae.train.metrics import EVAL_FILE
from fastsae.train.trainer import Trainer

FINETUNE_FILE = "finetune.json"
OUT_DIR = "finetuned"
# What the comparison shows, in this order (then per SAE: l0, explained_variance, mse, alive).
COMPARED = ["ce_increase", "kl", "ce_sae", "top1_agreement"]

# ------------------------------------------------------------------------------------ the run

def finetune(specs: list[str], *, model: str | None = None, config: str | None = None,
             overrides: list[str] | None = None, tokens: float | None = None, fraction: float | None = None,
             run_dir: str | Path | None = None, overwrite: bool = False, max_steps: int | None = None,
             log=print) -> dict:
    """Fine-tune the SAEs at ``specs`` (PATH[@HOOK] each) and measure them before and after; returns
    the finetune record (what finetune.json holds, with "after" and the written SAEs)."""
    sources = [load_source(spec) for spec in specs]
    if not sources:
        raise ConfigError("give at least one SAE")
    cfg, decided = finetune_config(sources, model=model, config=config, overrides=overrides, tokens=tokens,
                                   fraction=fraction)
    trainer = Trainer(cfg, run_dir=run_dir, saes={s.hook: s.sae for s in sources})
    main = trainer.layout.is_main  # under torchrun rank 0 writes and reports; every rank trains
    log = log if main else _quiet
    for note in decided["notes"]:
        log(f"fastsae finetune: note: {note}")
    if main:
        # Claimed (an old run moved aside with overwrite, refused without) before anything is written
        # or measured, and held through the before-eval; released just before fit() claims it again
        # as a fresh directory, where finetune.json stays.
        note = ckpt.claim_run_dir(trainer.run_dir, resume=False, overwrite=overwrite)
        if note:
            log(f"fastsae finetune: {note}")
    budget = decided["budget"]
    balance = f"balanced at the {cfg.loss.balance.upper()}'s scale" if cfg.loss.balance else "fixed coefficients"
    log(f"fastsae finetune: {len(sources)} SAE(s) ({sources[0].sae.activation}, {sources[0].sae.n_latents:,} latents) "
        f"on {cfg.model.name}, {budget['tokens']:,} tokens ({budget['from']}), KL + MSE {balance}, lr "
        f"{cfg.optim.lr:g} ({decided['lr']['from']}); run dir {trainer.run_dir}")
    before = trainer.evaluate(write=False)
    record = {"sources": [s.describe() for s in sources], "preset": decided["preset"], "budget": budget,
              "coefficients": decided["coefficients"], "lr": decided["lr"], "notes": decided["notes"],
              "before": _plain(before)}
    if main:  # written before training, so that --resume finishes the comparison
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(trainer.run_dir / FINETUNE_FILE, json.dumps(record, indent=2))
        ckpt.release_run_dir(trainer.run_dir)
    return _train_and_finish(trainer, record, max_steps, log)


def resume(run_dir: str | Path, *, overrides: list[str] | None = None, max_steps: int | None = None,
           log=print) -> dict:
    """Continue an interrupted fine-tune from its latest checkpoint and finish it."""
    run_dir = Path(run_dir)
    if not (run_dir / FINETUNE_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a fine-tune run (no {FINETUNE_FILE}); `fastsae train --resume` "
                          "continues other runs")
    record = read_json_object(run_dir / FINETUNE_FILE)
    trainer = Trainer.from_run_dir(run_dir, overrides=overrides)
    log = log if trainer.layout.is_main else _quiet
    log(f"fastsae finetune: resuming {run_dir} at step {trainer.step_count} ({trainer.tokens_seen:,} tokens)")
    return _train_and_finish(trainer, record, max_steps, log)


def _train_and_finish(trainer, record: dict, max_steps: int | None, log) -> dict:
    try:
        metrics = trainer.fit(max_steps=max_steps)
    except KeyboardInterrupt:
        log(f"fastsae finetune: continue with `fastsae finetune --resume {trainer.run_dir}`")
        raise
    if trainer.step_count < trainer.config.total_steps:  # stopped by max_steps: no final eval yet
        log(f"fastsae finetune: stopped at step {trainer.step_count} of {trainer.config.total_steps}; continue "
            f"with `fastsae finetune --resume {trainer.run_dir}`")
        return record
    after = {key: value for key, value in metrics.items() if key.startswith("eval/")}
    record["after"] = _plain(after)
    record["written"] = write_back(trainer, record)
    if not trainer.layout.is_main:
        return record
    eval_path = trainer.run_dir / EVAL_FILE
    if eval_path.is_file():  # the final eval's record (after), with the comparison added
        evaluation = read_json_object(eval_path)
        evaluation["before"] = record["before"]
        evaluation["finetune"] = {key: record.get(key) for key in ("sources", "preset", "budget", "coefficients", "lr")}
        atomic_write_text(eval_path, json.dumps(evaluation, indent=2))
    atomic_write_text(trainer.run_dir / FINETUNE_FILE, json.dumps(record, indent=2))
    log(compare(record["before"], record["after"], trainer.hooks))
    for hook, path in record["written"].items():
        log(f"fastsae finetune: {hook} -> {path}")
    return record


def _quiet(line: str) -> None:
    """The log of ranks other than 0 under torchrun."""


def _plain(metrics: dict) -> dict:
    """eval/<name> -> <name>, as plain numbers."""
    out = {}
    for key, value in metrics.items():
        value = value.item() if isinstance(value, torch.Tensor) else value
        out[key.removeprefix("eval/")] = value if not (isinstance(value, float) and not math.isfinite(value)) \
            else str(value)
    return out


def write_back(trainer, record: dict) -> dict[str, str]:
    """Each fine-tuned SAE in the format its source came in, under RUN_DIR/finetuned/: {hook: path}
    (collective under torchrun: sharded SAEs are gathered; rank 0 writes)."""
    written = {}
    for source in record["sources"]:
        hook, fmt = source["hook"], source["format"]
        sae = trainer.saes[hook]
        if hasattr(sae, "gather"):  # sharded: the whole SAE
            sae = sae.gather()
        if not trainer.layout.is_main:
            continue
        out = trainer.run_dir / OUT_DIR / _output_name(source)
        rec = sae.to_record()
        # A new SAE: a released source's identity (release, SAE id, Neuronpedia page; moved aside by
        # load_source) goes under "finetune", so that nothing reads the fine-tuned SAE as the release.
        metadata = dict(rec.metadata)
        released = metadata.pop("from_release", None)
        rec.metadata = {**metadata, "finetune": {"from": source["sae"], "tokens": trainer.tokens_seen,
                                                 "run": str(trainer.run_dir),
                                                 **({"from_release": released} if released else {})}}
        formats.save(rec, out, fmt)
        written[hook] = str(out)
    return written


def _output_name(source: dict) -> str:
    """sparsify: the hookpoint name (its directory name says the hook), in the source's spelling
    of the block list; the others: the hook."""
    if source["format"] != "sparsify":
        return source["hook"]
    name = Path(source["directory"]).name
    layers = sparsify_layers_name(name) or "layers"
    try:
        return formats.sparsify_hookpoint(source["hook"], layers)
    except ValueError:
        return name


def compare(before: dict, after: dict, hooks: list[str]) -> str:
    """The held-out metrics before and after, side by side, with the relative change."""
    keys = list(COMPARED)
    for hook in hooks:
        keys += [f"{name}/{hook}" for name in ("l0", "explained_variance", "mse", "alive")]
    rows = [(key, before[key], after[key]) for key in keys
            if isinstance(before.get(key), (int, float)) and isinstance(after.get(key), (int, float))]
    width = max(len(key) for key, _, _ in rows)
    label = {"ce_increase": "ce_increase (CE-loss gap)"}
    width = max(width, *(len(v) for v in label.values()))
    lines = [f"held-out metrics on {after.get('tokens', before.get('tokens', 0)):,} tokens, before and after:",
             f"  {'':<{width}}  {'before':>10}  {'after':>10}  {'change':>8}"]
    for key, old, new in rows:
        change = f"{100 * (new - old) / abs(old):+.1f} %" if old else ""
        lines.append(f"  {label.get(key, key):<{width}}  {old:>10.4g}  {new:>10.4g}  {change:>8}")
    return "\n".join(lines)


__all__ = ["PAPER_SHARE", "PRESETS", "Source", "compare", "finetune", "finetune_config", "load_source",
           "resume", "write_back"]
