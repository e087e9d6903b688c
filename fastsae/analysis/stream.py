"""What to analyse, and the held-out activations to analyse it on.

Shared by `fastsae analyze` and `fastsae dashboard`:

    inputs = load_targets(["runs/sweep-embedded"])                 # a sweep, run dirs, or SAE files
    lm = load_language_model(inputs.config)
    stream = ActivationStream(lm, held_out_batches(lm, inputs.config), hooks=["blocks.1.hook_resid_pre"],
                              n_tokens=1_000_000)
    for batch in stream:                                           # batch.tokens [B, T],
        x = batch.activations["blocks.1.hook_resid_pre"]           # batch.activations[hook] [B, T, d]
    stream.tokens, stream.ran_out                                  # tokens read; whether the data ended first

`load_targets` reads what a command line names, as `fastsae eval` does:
- a run directory (config.yaml): the SAEs of its latest checkpoint (`fastsae.load_run`), its
  config (model, data, eval settings; config.yaml plus the overrides of its resumes plus
  ``overrides``) and its eval.json when there is one;
- a sweep directory (no config.yaml; run directories inside, as `fastsae sweep` writes them):
  each run as above, and each must have its eval.json (a run without one is still training or
  was never evaluated: an error says which);
- PATH[@HOOK]: an SAE in any format `E2ESAE.from_pretrained` reads (fastsae, SAELens, sparsify,
  e2e_sae); HOOK picks one where the file holds several or does not name its hook; RELEASE:ID, a
  released SAE by name (fastsae.formats.releases). The model is
  ``model`` or the one the SAE names; data and eval settings come from ``config`` (a preset or
  YAML; default "embedded") and ``overrides``.
All SAEs must read one model, and (unless ``config`` is given) the runs must read the same data:
one stream of held-out tokens serves them all. Errors are AnalysisError (a ValueError) with a
one-line message naming the input.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from fastsae import formats
from fastsae.sae import E2ESAE
from fastsae.spec import hook_in_out


class AnalysisError(ValueError):
    """Bad input to an analysis (a path, a run, an SAE, a comparison); the message names it."""


@dataclass
class SAETarget:
    """One SAE to analyse, with what is known about where it came from.

    label: a unique, readable name (the run directory's name; "<run>/<hook>" for a run with several
        SAEs; the file's name, with "@HOOK" where one was given).
    objective: "local", "e2e" or "e2e+ds" for an SAE of a fastsae run (from its loss), None otherwise.
    eval: the run's eval.json record (fastsae.train.metrics.write_eval_json), None without one.
    """

    label: str
    hook: str
    sae: E2ESAE
    origin: str
    run_dir: Path | None = None
    objective: str | None = None
    sparsity_coeff: float | None = None
    seed: int | None = None
    step: int | None = None
    eval: dict | None = None

    @property
    def hook_in(self) -> str:
        """The hook it reads: ``hook`` for an SAE, IN for a transcoder "IN->OUT"."""
        return hook_in_out(self.hook)[0]

    @property
    def hook_out(self) -> str:
        """The hook it writes (and is compared with): ``hook`` for an SAE, OUT for a transcoder."""
        return hook_in_out(self.hook)[1]

    def eval_metric(self, name: str) -> float | None:
        """A metric of the run's eval.json for this SAE: l0, alive, explained_variance per hook
        ("<name>/<hook>"), else the run-wide value (ce_increase, kl, ...); None without eval data."""
        if self.eval is None:
            return None
        metrics = self.eval.get("metrics", {})
        value = metrics.get(f"{name}/{self.hook}", metrics.get(name))
        return None if value is None else float(value)


@dataclass
class AnalysisInputs:
    """The SAEs to analyse and the config whose model and held-out data serve them all."""

    targets: list[SAETarget]
    config: object  # fastsae.train.config.TrainConfig
    notes: list[str] = field(default_factory=list)

    def by_label(self, label: str) -> SAETarget:
        for target in self.targets:
            if target.label == label:
                return target
        raise AnalysisError(f"no SAE labelled {label!r}; the SAEs are: {', '.join(t.label for t in self.targets)}")


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def _sweep_runs(path: Path) -> list[Path]:
    """The run directories inside a sweep directory (runs moved aside by --overwrite excluded)."""
    return sorted(child for child in path.iterdir()
                  if child.is_dir() and _is_run_dir(child) and ".replaced-" not in child.name)


def _run_targets(run_dir: Path, overrides: Sequence[str], device, *, require_eval: bool):
    from fastsae import load_run
    from fastsae.train import checkpoint as ckpt
    from fastsae.train.config import ConfigError
    from fastsae.train.metrics import read_eval_json, run_objective

    try:
        config = ckpt.load_run_config(run_dir, list(overrides))
    except ConfigError as error:
        raise AnalysisError(f"{run_dir}: {error}") from None
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise AnalysisError(f"{run_dir} has no complete checkpoint (is it still starting?)")
    try:
        record = read_eval_json(run_dir)
    except FileNotFoundError:
        if require_eval:
            raise AnalysisError(f"{run_dir} has no eval.json (still training, or evaluate it with "
                                f"`fastsae eval {run_dir}`)") from None
        record = None
    except ValueError as error:
        raise AnalysisError(str(error)) from None
    try:
        saes = load_run(run_dir, device=device)
    except (ValueError, FileNotFoundError) as error:
        raise AnalysisError(f"{run_dir}: {error}") from None
    objective = run_objective(config.to_dict())
    step = int(latest.name.removeprefix("step_"))
    targets = []
    for hook in sorted(saes):
        label = run_dir.name if len(saes) == 1 else f"{run_dir.name}/{hook}"
        targets.append(SAETarget(label, hook, saes[hook], str(run_dir), run_dir, objective,
                                 float(config.loss.sparsity_coeff), int(config.seed), step, record))
    return targets, config


def _file_target(spec: str, device) -> SAETarget:
    from fastsae.formats.releases import split_release_name

    path, hook = formats.split_hook(spec)
    if not Path(path).exists() and split_release_name(path) is None:
        raise AnalysisError(f"{spec}: no such file or directory, nor a released SAE RELEASE:ID "
                            "(`fastsae releases` lists them)")
    try:
        sae = E2ESAE.from_pretrained(path, hook=hook, device=device)
    except (ValueError, FileNotFoundError) as error:
        raise AnalysisError(f"{spec}: {error}") from None
    hook = hook or sae.metadata.get("hook")
    if not hook:
        raise AnalysisError(f"{spec}: the SAE does not say which hook it reads; write {path}@HOOK")
    label = Path(path).name + (f"@{hook}" if "@" in spec else "")
    return SAETarget(label, hook, sae, spec)


def check_widths(lm, coders: dict[str, tuple[str, E2ESAE]], error=None) -> dict[str, tuple[int, int]]:
    """Check each coder of ``coders`` ({name: (hook, sae)}) against the model: its hooks exist (a
    transcoder's IN and OUT, fastsae.spec.hook_in_out), it reads d_in = the width of the activation
    at IN and writes d_out = the width at OUT (one 2-token probe run). Returns {name: (width at IN,
    width at OUT)}. A mismatch raises ``error`` (default AnalysisError) naming the coder."""
    error = error or AnalysisError
    names = {}
    for name, (hook, _) in coders.items():
        try:
            names[name] = hook_in_out(hook)
            for point in names[name]:
                lm.validate_hook(point)
        except ValueError as problem:
            raise error(f"{name}: {problem}") from None
    measured = lm.activation_widths([point for pair in names.values() for point in pair])
    widths = {}
    for name, (hook, sae) in coders.items():
        hook_in, hook_out = names[name]
        widths[name] = (measured[hook_in], measured[hook_out])
        if sae.d_in != widths[name][0]:
            raise error(f"{name} reads d_in={sae.d_in}, but {hook_in} of the model is {widths[name][0]} wide: "
                        "it was not trained on this model or hook")
        if sae.d_out != widths[name][1]:
            raise error(f"{name} writes d_out={sae.d_out}, but {hook_out} of the model is {widths[name][1]} wide: "
                        "it was not trained on this model or hook")
    return widths


def load_targets(specs: Sequence[str | os.PathLike], *, model: str | None = None, config: str | None = None,
                 overrides: Sequence[str] = (), device: str | torch.device | None = None,
                 require_eval: bool = False) -> AnalysisInputs:
    """The SAEs that ``specs`` name (run dirs, sweep dirs, PATH[@HOOK]; see the module docstring).

    model: the model for SAE files (default: the one they name); for runs, a check that they name it.
    config: preset or YAML for the data and eval settings (default: the runs' own; "embedded" for
        SAE files alone). overrides: KEY=VALUE config overrides, applied to every run's config too.
    require_eval: every run (not only a sweep's) must have its eval.json.
    """
    from fastsae.train.config import ConfigError, load_config

    if not specs:
        raise AnalysisError("give at least one run directory, sweep directory or SAE path")
    device = resolve_device(device)
    targets: list[SAETarget] = []
    run_configs = []  # (origin, TrainConfig)
    notes = []
    for spec in map(str, specs):
        path = Path(spec)
        if path.is_dir() and _is_run_dir(path):
            found, run_config = _run_targets(path, overrides, device, require_eval=require_eval)
            targets += found
            run_configs.append((str(path), run_config))
        elif path.is_dir() and _sweep_runs(path):
            for run_dir in _sweep_runs(path):
                found, run_config = _run_targets(run_dir, overrides, device, require_eval=True)
                targets += found
                run_configs.append((str(run_dir), run_config))
        elif path.is_dir() and not any(path.iterdir()):
            raise AnalysisError(f"{path} is empty: no run, sweep or SAE in it")
        else:
            targets.append(_file_target(spec, device))
    _make_labels_unique(targets)

    # the model every SAE reads
    models = {c.model.name for _, c in run_configs}
    models |= {t.sae.metadata["model"] for t in targets if t.run_dir is None and t.sae.metadata.get("model")}
    if model is not None:
        wrong = sorted(name for name in {c.model.name for _, c in run_configs} if name != model)
        if wrong:
            raise AnalysisError(f"--model {model}: the runs were trained on {wrong}")
        models = {model}
    try:
        model_name = formats.one_model(models)
    except ValueError as error:
        raise AnalysisError(f"{error}: analyse one model at a time") from None

    # the config whose data and eval settings give the held-out tokens
    if config is not None or not run_configs:
        try:
            stream_config = load_config(config or "embedded", [*overrides, f"model.name={json.dumps(model_name)}"])
        except ConfigError as error:
            raise AnalysisError(f"--config: {error}") from None
    else:
        origin, stream_config = run_configs[0]
        for other_origin, other in run_configs[1:]:
            if (other.data_spec(), other.data.context_length) != (stream_config.data_spec(),
                                                                   stream_config.data.context_length):
                raise AnalysisError(f"{origin} and {other_origin} read different data; give --config to "
                                    "pick the held-out data for all of them")
    for target in targets:
        if target.run_dir is None and target.sae.metadata.get("model") not in (None, model_name):
            notes.append(f"{target.label} names model {target.sae.metadata['model']!r}; analysed on {model_name!r}")
    return AnalysisInputs(targets, stream_config, notes)


def _make_labels_unique(targets: list[SAETarget]) -> None:
    seen: dict[str, int] = {}
    for target in targets:
        if target.label in seen:
            seen[target.label] += 1
            parent = Path(target.origin.split("@")[0]).parent.name
            candidate = f"{parent}/{target.label}" if parent else target.label
            target.label = candidate if candidate not in seen else f"{target.label}#{seen[target.label]}"
        seen.setdefault(target.label, 1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA where there is one, else the CPU (fastsae.train.setup.resolve_device)."""
    from fastsae.train import setup
    from fastsae.train.config import ConfigError

    try:
        return setup.resolve_device("auto" if device is None else str(device))
    except ConfigError as error:
        raise AnalysisError(str(error)) from None


def load_language_model(config, device: str | torch.device | None = None):
    """The LanguageModel that ``config`` (a TrainConfig) names, in its dtype, on ``device``."""
    from fastsae.train import setup

    return setup.load_language_model(config, None, resolve_device(device))[0]


def held_out_batches(lm, config, *, split: str = "eval", batch_size: int | None = None):
    """The token stream a run's eval reads (the evaluator's): ``config``'s data, its ``split``
    ("eval": held out from training), config.eval.batch_size rows of data.context_length tokens."""
    from fastsae.train import setup

    try:
        return setup.build_stream(config, lm, split, batch_size or config.eval.batch_size)
    except (ValueError, FileNotFoundError) as error:
        raise AnalysisError(f"the {split} data: {error}") from None


class TokenBatches:
    """Token batches [B, T] from ``batches`` until ``n_tokens`` tokens.

    The last batch is cut to the rows still needed (so up to T - 1 tokens more than asked come).
    A fastsae TokenStream loops forever: iteration stops where its data would wrap around (no
    token is read twice), so fewer tokens may come than asked. After iterating, ``tokens`` is the
    number of tokens yielded and ``ran_out`` whether the data ended before n_tokens.
    """

    def __init__(self, batches: Iterable[torch.Tensor], n_tokens: int, device: torch.device | str | None = None):
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
            raise AnalysisError(f"n_tokens must be a positive int, got {n_tokens!r}")
        self.batches = batches
        self.n_tokens = n_tokens
        self.device = device
        self.tokens = 0
        self.ran_out = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = iter(self.batches)
        start_epoch = getattr(batches, "epoch", None)
        self.tokens, self.ran_out = 0, False
        while self.tokens < self.n_tokens:
            try:
                tokens = next(batches)
            except StopIteration:
                self.ran_out = True
                break
            if start_epoch is not None and batches.epoch > start_epoch:
                self.ran_out = True  # this batch reaches into the data's second pass
                break
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
                raise AnalysisError(f"token batches must be [batch, ctx] tensors, got "
                                    f"{getattr(tokens, 'shape', type(tokens).__name__)}")
            rows = min(tokens.shape[0], math.ceil((self.n_tokens - self.tokens) / tokens.shape[1]))
            tokens = tokens[:rows].to(self.device or tokens.device, torch.long)
            self.tokens += tokens.numel()
            yield tokens
        if self.tokens == 0:
            raise AnalysisError("the held-out data yielded no full batch (fewer tokens than one batch of "
                                "eval.batch_size x data.context_length)")
        if self.ran_out and self.tokens < self.n_tokens:
            warnings.warn(f"the held-out data ran out after {self.tokens:,} tokens ({self.n_tokens:,} asked); "
                          "each held-out token was read once", stacklevel=2)


@dataclass
class ActivationBatch:
    """tokens [B, T] (int64) and the clean activations {hook: [B, T, d]} at the asked hooks (detached)."""

    tokens: torch.Tensor
    activations: dict[str, torch.Tensor]


class ActivationStream:
    """Clean held-out activations at ``hooks``, batch by batch, until ``n_tokens`` tokens.

    lm: a fastsae LanguageModel. batches: token batches [B, T] (held_out_batches(lm, config), or any
    iterable of LongTensors). Each batch runs the model without gradient only as far as the last
    hook (LanguageModel.activations). Iterating again reads ``batches`` again from where it stands
    (a TokenStream continues; give a fresh one to start over). After iterating: ``tokens`` read and
    whether the data ``ran_out`` first (see TokenBatches).
    """

    def __init__(self, lm, batches: Iterable[torch.Tensor], hooks: Sequence[str], n_tokens: int):
        if not hooks:
            raise AnalysisError("give at least one hook to stream")
        for hook in hooks:
            try:
                lm.validate_hook(hook)
            except ValueError as error:
                raise AnalysisError(str(error)) from None
        self.lm = lm
        self.hooks = list(dict.fromkeys(hooks))
        self._tokens = TokenBatches(batches, n_tokens, device=lm.device)

    @property
    def tokens(self) -> int:
        return self._tokens.tokens

    @property
    def ran_out(self) -> bool:
        return self._tokens.ran_out

    def __iter__(self) -> Iterator[ActivationBatch]:
        for tokens in self._tokens:
            yield ActivationBatch(tokens, self.lm.activations(tokens, self.hooks))
