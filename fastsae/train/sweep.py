"""Sweeps: a grid of sparsity coefficients for local, e2e and e2e+ds SAEs, one run directory each.

    fastsae sweep --family embedded               # the default grid below, in runs/sweep-embedded
    fastsae plot runs/sweep-embedded --out figs   # the paper's figure from it

Each family sweeps one config key (SWEPT_KEYS): the sparsity coefficient loss.sparsity_coeff, or
TopK's k (saes.k) for the TopK families (embedded-transcoder), whose L0 k sets and whose
sparsity_coeff is 0. Each point (objective, value, seed) trains its objective's preset with that value in
OUT/<objective>-s<coeff>-seed<seed>/ (-k<k>- for a k sweep), an ordinary run directory (config.yaml, metrics.jsonl,
checkpoints/, eval.json). A sweep can be stopped and run again: a finished point (its final
checkpoint and eval.json) is skipped, a started one resumes from its latest checkpoint, and a
point whose final eval is missing is only evaluated. Several `fastsae sweep` processes with the
same arguments share the grid: each point is claimed with an exclusive lock (flock on
RUN_DIR.lock, released by the OS when its process ends), and a process skips points another one
holds.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastsae.train import checkpoint as ckpt
from fastsae.train.config import ConfigError, load_config
from fastsae.train.metrics import EVAL_FILE, OBJECTIVES, read_eval_json

# The presets each family trains for each objective.
FAMILIES = {
    "embedded": {"local": "embedded-local", "e2e": "embedded", "e2e+ds": "embedded-e2e-ds"},
    "gpt2": {"local": "gpt2-local", "e2e": "gpt2-e2e", "e2e+ds": "gpt2-e2e-ds"},
    "tinystories": {"local": "tinystories-local", "e2e": "tinystories-e2e", "e2e+ds": "tinystories-e2e-ds"},
    # transcoders of block 1's MLP (IN->OUT: its input after ln2 -> its output), TopK
    "embedded-transcoder": {"local": "embedded-transcoder", "e2e": "embedded-transcoder-e2e",
                            "e2e+ds": "embedded-transcoder-e2e-ds"},
}
# The config key each family sweeps (default loss.sparsity_coeff), and its run directories' letter.
SPARSITY_KEY = "loss.sparsity_coeff"
SWEPT_KEYS = {"embedded-transcoder": "saes.k"}
KEY_LETTERS = {SPARSITY_KEY: "s", "saes.k": "k"}
# Sparsity coefficients per objective: around each preset's value, spread so that the curves share an
# L0 range. On the embedded model they span L0 ~10 to ~190 (benchmarks/results/paper_figure/);
# the 12 runs of 400k tokens took 5.4 min on an idle 2-core CPU (two sweep processes, one thread each).
DEFAULT_COEFFS = {
    "embedded": {"local": [0.5, 1.0, 2.0, 4.0], "e2e": [0.75, 1.5, 3.0, 6.0], "e2e+ds": [0.75, 1.5, 3.0, 6.0]},
    "gpt2": {"local": [0.8, 2.0, 4.0, 6.0, 10.0], "e2e": [0.5, 1.5, 3.0, 5.0, 10.0], "e2e+ds": [0.5, 1.5, 3.0, 5.0, 10.0]},
    "tinystories": {"local": [0.8, 2.0, 4.0, 6.0, 10.0], "e2e": [0.5, 1.5, 3.0, 5.0, 10.0], "e2e+ds": [0.5, 1.5, 3.0, 5.0, 10.0]},
    # k: the same L0 for every objective, so the curves compare at equal L0 by construction
    "embedded-transcoder": {objective: [8, 16, 32, 64] for objective in OBJECTIVES},
}


def swept_key(family: str) -> str:
    """The config key a family's sweep sets at each point (SWEPT_KEYS; loss.sparsity_coeff by default)."""
    return SWEPT_KEYS.get(family, SPARSITY_KEY)


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its objective's preset with ``key`` (the family's swept config key) = value."""

    objective: str
    preset: str
    value: float
    seed: int
    run_dir: Path
    key: str = SPARSITY_KEY

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def sparsity_coeff(self) -> float | None:
        """The point's sparsity coefficient where the sweep sets it (None: the preset's, e.g. a k sweep)."""
        return self.value if self.key == SPARSITY_KEY else None

    def override(self) -> str:
        """The point's value as a config override (k an int)."""
        return f"{self.key}={int(self.value) if self.key == 'saes.k' else self.value}"


def _coeff_text(coeff: float) -> str:
    return f"{coeff:g}"


def sweep_points(out: str | os.PathLike, family: str = "embedded", objectives=OBJECTIVES,
                 coeffs: dict[str, list[float]] | None = None, seeds=(0,)) -> list[SweepPoint]:
    """The grid: every objective x value of the family's swept key (swept_key: a sparsity coefficient,
    or k) x seed, with its run directory under `out`."""
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    objectives = list(objectives)
    for objective in objectives:
        if objective not in OBJECTIVES:
            raise ConfigError(f"objectives: each must be one of {OBJECTIVES}, got {objective!r}")
    coeffs = {**DEFAULT_COEFFS[family], **(coeffs or {})}
    key = swept_key(family)
    what = "sparsity coefficients" if key == SPARSITY_KEY else f"values of {key}"
    points = []
    for objective in objectives:
        if not coeffs[objective]:
            raise ConfigError(f"no {what} for objective {objective!r}")
        for coeff in coeffs[objective]:
            if key == "saes.k" and not (coeff >= 1 and float(coeff).is_integer()):
                raise ConfigError(f"saes.k (family {family}'s swept key) must be a whole number >= 1, got {coeff!r} "
                                  f"for {objective!r}")
            if not coeff >= 0:
                raise ConfigError(f"{what} must be >= 0, got {coeff!r} for {objective!r}")
            for seed in seeds:
                run_dir = Path(out) / f"{objective.replace('+', '')}-{KEY_LETTERS[key]}{_coeff_text(coeff)}-seed{seed}"
                points.append(SweepPoint(objective, FAMILIES[family][objective], float(coeff), int(seed), run_dir, key))
    return points


def point_config(point: SweepPoint, overrides: list[str] | None = None):
    """The point's TrainConfig: its preset, swept value (coefficient or k), seed and run dir, then `overrides`."""
    return load_config(point.preset, [
        f"name={point.name}", point.override(), f"seed={point.seed}", f"run_dir={point.run_dir}", *(overrides or [])])


@contextmanager
def claim(run_dir: Path):
    """Yield True if this process holds RUN_DIR.lock exclusively (False: another one does)."""
    lock_path = run_dir.with_name(run_dir.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def point_status(point: SweepPoint, total_steps: int) -> str:
    """"done" (final checkpoint and its eval.json), "needs_eval", "partial" or "new"."""
    latest = ckpt.latest_checkpoint(point.run_dir)
    step = -1 if latest is None else int(latest.name.removeprefix("step_"))
    if step >= total_steps:
        try:
            evaluated = read_eval_json(point.run_dir).get("step", -1) >= total_steps
        except (FileNotFoundError, ValueError):
            evaluated = False
        return "done" if evaluated else "needs_eval"
    return "new" if latest is None else "partial"


def run_point(point: SweepPoint, overrides: list[str] | None = None, model=None, log=print) -> str:
    """Train (or resume, or only evaluate) one point; returns what was done."""
    from fastsae.train.evaluator import evaluate_run
    from fastsae.train.trainer import Trainer

    config = point_config(point, overrides)
    status = point_status(point, config.total_steps)
    if status == "done":
        return "skipped (done)"
    if status == "new":
        trainer = Trainer(config, model=model, run_dir=point.run_dir)
        trainer.fit()
        return "trained"
    # the saved config.yaml (not the preset as it is now) defines a started run
    if status == "partial":
        trainer = Trainer.from_run_dir(point.run_dir, model=model, overrides=overrides)
        log(f"  resuming at step {trainer.step_count}")
        trainer.fit()
        return "resumed"
    evaluate_run(point.run_dir, overrides=overrides, model=model)  # writes eval.json; no optimizer
    return "evaluated"


def _load_model(config):
    from fastsae.train import setup

    return setup.load_language_model(config, None, setup.resolve_device(config.device))[0]


def run_sweep(points: list[SweepPoint], overrides: list[str] | None = None, model=None, log=print) -> dict:
    """Run every point this process can claim; returns {run_dir: outcome}.

    `model` (a LanguageModel) is shared by all points; None loads the first point's model once,
    when a point needs it (the points of a family share one model, and it stays frozen).
    """
    outcomes = {}
    for i, point in enumerate(points, 1):
        if model is None and point_status(point, point_config(point, overrides).total_steps) != "done":
            model = _load_model(point_config(point, overrides))
        with claim(point.run_dir) as mine:
            if not mine:
                outcomes[point.run_dir] = "skipped (another process holds it)"
                log(f"[{i}/{len(points)}] {point.name}: held by another process, skipped")
                continue
            start = time.perf_counter()
            log(f"[{i}/{len(points)}] {point.name} ({point.preset}, {point.key.split('.')[-1]} {point.value:g}, "
                f"seed {point.seed})")
            outcome = run_point(point, overrides, model=model, log=log)
            outcomes[point.run_dir] = outcome
            log(f"  {outcome} in {time.perf_counter() - start:.0f} s -> {point.run_dir / EVAL_FILE}")
    return outcomes
