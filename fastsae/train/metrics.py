"""Training metrics: dead-latent tracking and the sinks (console, metrics.jsonl, eval.json, wandb).

Metric names (per SAE ones end in /<hook>; eval ones start with eval/):
    loss                  the total loss that was minimised
    loss/<term>           each coefficient * term: sparsity, kl, local_mse, downstream, auxk
    kl                    KL(p_orig || p_sae) per token (nats), mean over tokens
    ce_orig, ce_sae       next-token cross-entropy (nats) of the clean model and of the model with
                          the SAEs spliced in; ce_increase = ce_sae - ce_orig
    top1_agreement        share of tokens where both runs' most likely next token agree
    l0/<hook>             mean active latents per token; l0 is the mean over SAEs
    mse/<hook>            SAE output vs input, mean over elements
    explained_variance/<hook>   the SAE's input x the target (the usual definition, the paper
                          code's calc_explained_variance with x as target): mean over tokens t of
                          1 - ||x_t - x_hat_t||^2 / ||x_t - mean_s x_s||^2 (mean over the batch)
    explained_variance_ln/<hook>   (eval) the same after layer-norming both (e2e_sae's _ln variant)
    explained_variance_out_to_in/<hook>, ..._out_to_in_ln/<hook>   (eval) what the paper's code logs
                          as the local EV (OutToInLoss): the SAE's *output* as the target; compare
                          it only with the published runs
    alive/<hook>, dead/<hook>   latents that fired / did not fire in the last log.dead_window_tokens
                          training tokens (eval: on the eval tokens)
    rare/<hook>           (eval) latents that fired on fewer than RARE_FREQUENCY of the eval tokens,
                          the never-fired included (firing_counts)
    downstream_mse/<hook> spliced vs clean activations at a downstream hook, mean over elements
                          (training: the e2e+ds loss hooks; eval: also every later block's
                          hook_resid_pre and the final residual)
    downstream_explained_variance/<hook>, downstream_explained_variance_ln/<hook>   (eval)
                          explained variance of the clean activations by the spliced run's, as above
    grad_norm             SAE parameters' gradient norm before clipping
    lr, tokens, tokens_per_s, step

A transcoder's <hook> is "IN->OUT" (it reads IN, writes OUT in place of the model's activation there,
e.g. an MLP's output): its mse/, explained_variance/ (and _ln, _out_to_in) compare its output with
the activation the model computed at OUT, the one it replaces, not with its input; so
explained_variance/IN->OUT is the share of the MLP output's variance it explains, and kl,
ce_increase are those of the model with OUT replaced. eval.json's "transcoders" entry and the
console summary say so per transcoder (transcoder_notes).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from fastsae._files import atomic_write_text, read_json_object


class DeadLatentTracker:
    """Tokens since each latent last fired; dead = not fired in the last `window` tokens.

    Until `window` tokens have been seen no latent counts as dead (so AuxK starts after the first
    window, as in sparsify): a latent needs a full window of silence to be called dead.
    """

    def __init__(self, n_latents: int, window: int, device=None):
        self.window = window
        self.since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.since_fired += n_tokens
        self.since_fired.masked_fill_(fired, 0)  # not since_fired[fired] = 0: a bool index syncs with the GPU

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.window

    def n_dead(self) -> int:
        return int(self.dead_mask().sum())

    def state_dict(self) -> dict:
        return {"since_fired": self.since_fired.cpu().clone(), "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.since_fired.copy_(state["since_fired"])


RARE_FREQUENCY = 1e-3  # rare/<hook>: fired on fewer than 1 in 1,000 eval tokens


def firing_counts(tokens_fired: torch.Tensor, n_tokens: int) -> dict[str, torch.Tensor]:
    """The eval's per-SAE latent counts from tokens_fired[i], the number of the n_tokens eval tokens
    on which latent i fired: {"alive": latents that fired at all, "rare": latents that fired on fewer
    than RARE_FREQUENCY * n_tokens of them, the never-fired included}, as 0-d tensors (a sharded SAE's
    ranks each count their own latents; the sums over shards are the SAE's counts).

    "alive" is the same on every sweep point when no latent dies; "rare" still shows how many
    latents are nearly unused, the second measure of a dictionary's effective size.
    """
    if tokens_fired.dim() != 1 or tokens_fired.is_floating_point():
        raise ValueError(f"tokens_fired must be a 1-d integer tensor (one count per latent), got "
                         f"{tuple(tokens_fired.shape)} {tokens_fired.dtype}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return {"alive": (tokens_fired > 0).sum(), "rare": (tokens_fired < RARE_FREQUENCY * n_tokens).sum()}


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Writes metric records to RUN_DIR/metrics.jsonl (appending: a resumed run continues the
    file) and to wandb when config.wandb.project is set."""

    def __init__(self, run_dir: str | os.PathLike, wandb_config=None, run_config: dict | None = None,
                 run_name: str | None = None, resume_id: str | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self.wandb_run = None
        if wandb_config is not None and wandb_config.project:
            self.wandb_run = _start_wandb(wandb_config, run_config, run_name, resume_id, run_dir)

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(cfg, run_config, run_name, resume_id, run_dir):
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb.project is set but wandb is not installed: `pip install wandb` "
                          "(or `pip install fastsae[wandb]`), or unset wandb.project") from None
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, mode=cfg.mode,
                      tags=list(cfg.tags) or None, config=run_config, dir=str(run_dir),
                      id=resume_id, resume="allow" if resume_id else None)


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop the records after `step` from RUN_DIR/metrics.jsonl (atomically).

    A run that crashed logged steps after its last checkpoint; the resumed run logs them again
    from that checkpoint, so the old records would otherwise appear twice.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _parsed_step(line) <= step]
    if len(kept) == len(lines):
        return
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _parsed_step(line: str) -> float:
    """A metrics record's step; inf (dropped) for a line a killed process left half-written."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


EVAL_FILE = "eval.json"


# The training objectives, in the paper's order: what the loss reconstructs (the SAE's input; the
# model's output; the output and later activations). The one list the figures, tables and sweeps
# follow. (Formerly "run kinds": RUN_KINDS and run_kind still import, with a DeprecationWarning.)
OBJECTIVES = ("local", "e2e", "e2e+ds")
_RENAMED = {"RUN_KINDS": "OBJECTIVES", "run_kind": "run_objective"}


def __getattr__(name):
    if name in _RENAMED:
        import warnings

        warnings.warn(f"fastsae.train.metrics.{name} is deprecated: it is now {_RENAMED[name]}", DeprecationWarning,
                      stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_objective(config: dict) -> str:
    """The run's objective (one of OBJECTIVES) from a config dict's loss section (TrainConfig.to_dict())."""
    loss = config["loss"]
    if loss.get("downstream_coeff", 0) > 0:
        return "e2e+ds"
    return "e2e" if loss.get("kl_coeff", 0) > 0 else "local"


def write_eval_json(run_dir: str | os.PathLike, metrics: dict, config: dict, *, step: int,
                    training_tokens: int, n_latents: int | None = None, extra: dict | None = None) -> Path:
    """Write RUN_DIR/eval.json atomically (temporary file, fsync, rename) and return its path.

    It holds the run's name, objective (local / e2e / e2e+ds), SAE activation, sparsity coefficient, hooks and total
    latents, the step and training tokens the SAEs had, the eval tokens, and `metrics`: Trainer.evaluate's
    result with the "eval/" prefix dropped; ``extra``'s keys beside them (e.g. "saebench": SAEBench's core
    record). A later eval of the run replaces it.
    """
    path = Path(run_dir) / EVAL_FILE
    record = {
        "run": config.get("name"),
        "model": (config.get("model") or {}).get("name"),
        "objective": run_objective(config),
        "activation": config["saes"]["activation"],
        "k": config["saes"].get("k"),
        "sparsity_coeff": config["loss"]["sparsity_coeff"],
        "hooks": list(config["saes"]["hooks"]),
        "n_latents": n_latents,
        "step": step,
        "training_tokens": training_tokens,
        "eval_tokens": _jsonable(metrics.get("eval/tokens")),
        "metrics": {key.removeprefix("eval/"): _jsonable(value) for key, value in metrics.items()},
        **transcoder_notes(config["saes"]["hooks"]),
        **(extra or {}),
    }
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


def transcoder_notes(hooks) -> dict:
    """{"transcoders": {hook: what its metrics compare}} for the transcoders "IN->OUT" among
    ``hooks`` (eval.json's entry; see the module docstring); {} where there is none."""
    from fastsae.spec import hook_in_out

    notes = {}
    for hook in hooks:
        hook_in, hook_out = hook_in_out(hook)
        if hook_in != hook_out:
            notes[hook] = {"reads": hook_in, "writes": hook_out, "compared_with": hook_out,
                           "note": f"mse/ and explained_variance/ of {hook} compare its output with the model's "
                                   f"activation at {hook_out} (the one it replaces); kl and ce_increase are of the "
                                   f"model with {hook_out} replaced"}
    return {"transcoders": notes} if notes else {}


def read_eval_json(run_dir: str | os.PathLike) -> dict:
    """RUN_DIR/eval.json as written by write_eval_json (FileNotFoundError if the run has none). One
    written before "objective" was named so holds it as "kind": returned under "objective"."""
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {EVAL_FILE}: run `fastsae eval {run_dir}` first")
    return with_objective(read_json_object(path))


def with_objective(record: dict) -> dict:
    """An eval.json or sweep record with its objective under "objective" (older ones: "kind")."""
    if "objective" not in record and "kind" in record:
        record = {("objective" if key == "kind" else key): value for key, value in record.items()}
    return record


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_metrics(metrics: dict, keys: list[str] | None = None) -> str:
    """An aligned 'name  value' table for the console."""
    items = [(k, metrics[k]) for k in (keys or metrics) if k in metrics]
    width = max((len(k) for k, _ in items), default=0)
    lines = []
    for key, value in items:
        value = _jsonable(value)
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<{width}}  {text}")
    return "\n".join(lines)


# The metrics printed at the end of fit() and by `fastsae eval`, in this order (then per SAE).
SUMMARY_KEYS = ["kl", "ce_orig", "ce_sae", "ce_increase", "top1_agreement", "l0"]


def log_line(metrics: dict, step: int, total: int) -> str:
    """One plain console line for a logged step (what the progress bar shows, when it is off)."""
    parts = [f"step {step}/{total}", f"tokens {int(metrics['tokens']):,}"]
    for key, fmt in (("loss", ".4g"), ("kl", ".4g"), ("ce_increase", ".4g"), ("l0", ".1f"), ("lr", ".3g"),
                     ("tokens_per_s", ".3g")):
        if key in metrics:
            parts.append(f"{key} {float(metrics[key]):{fmt}}")
    return "fastsae: " + ", ".join(parts)


def summarize(metrics: dict, hooks: list[str] | None = None, prefix: str = "") -> str:
    """The headline metrics as a console table: the global ones, then each SAE's (hooks: in this
    order; None: every hook with an l0 entry)."""
    if hooks is None:
        hooks = [key.removeprefix(prefix + "l0/") for key in metrics if key.startswith(prefix + "l0/")]
    keys = [prefix + k for k in SUMMARY_KEYS]
    for hook in hooks:
        keys += [f"{prefix}{name}/{hook}" for name in ("l0", "explained_variance", "mse", "alive")]
    keys += [k for k in metrics if k.startswith((prefix + "downstream_mse/", prefix + "downstream_explained_variance/"))]
    notes = transcoder_notes(hooks).get("transcoders", {})
    return format_metrics(metrics, keys) + "".join(f"\n  (transcoder: {note['note']})" for note in notes.values())
