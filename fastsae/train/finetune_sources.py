"""What `fastsae finetune` starts from and the config it trains with (see fastsae.train.finetune).

    sources = [load_source("runs/local"), load_source("released@blocks.6.hook_resid_pre")]
    config, decided = finetune_config(sources, model="gpt2")

load_source reads an SAE in any format E2ESAE.from_pretrained reads, with what its files say about
its training (tokens, loss coefficients, model); finetune_config layers the preset, the SAEs' kind
and size, the source run's loss with its reconstruction term replaced by the balanced KL + MSE, the
budget and the user's --set, and says where each coefficient came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsae import formats, runs
from fastsae.formats import releases
from fastsae._dtypes import dtype_name
from fastsae._files import read_json_object
from fastsae.sae import E2ESAE
from fastsae.train import checkpoint as ckpt
from fastsae.train.config import ConfigError, TrainConfig, apply_overrides, load_config, resolve_config_path

# The paper's share: its final 25M tokens of SAEBench's 500M-token training runs.
PAPER_SHARE = 0.05
# The preset a model family fine-tunes with (its data, eval and optimizer settings).
PRESETS = {"embedded": "embedded-finetune", "gpt2": "gpt2-finetune", "roneneldan/TinyStories-1M": "tinystories-finetune"}
# The loss keys a source run passes on to its fine-tune (the reconstruction terms are replaced).
KIND_LOSS_KEYS = ("sparsity_coeff", "sparsity_p", "auxk_coeff", "auxk_k")


@dataclass
class Source:
    """One SAE to fine-tune: where it came from and what its files say about its training."""

    spec: str  # as given: PATH[@HOOK]
    path: Path
    hook: str
    format: str  # the format it is written back in: fastsae, saelens or sparsify
    found: str  # what the path was (formats.detect_format): a run, a checkpoint, a collection, ...
    directory: Path | None  # the SAE's own directory (None: inside an e2e_sae .pt file)
    sae: E2ESAE
    training_tokens: int | None
    loss: dict | None  # the loss coefficients it was trained with, where its files say
    model: str | None
    final_lr: float | None = None  # the learning rate its schedule ended at, where its files say

    def describe(self) -> dict:
        return {"sae": self.spec, "hook": self.hook, "format": self.format, "found": self.found,
                "directory": None if self.directory is None else str(self.directory),
                "activation": self.sae.activation, "k": self.sae.k, "n_latents": self.sae.n_latents,
                "training_tokens": self.training_tokens, "trained_with": self.loss, "final_lr": self.final_lr}


def load_source(spec: str) -> Source:
    """The SAE at PATH[@HOOK], or the released SAE RELEASE:ID (its files from the Hugging Face
    cache, fastsae.formats.releases), and what its files say about how it was trained."""
    named = releases.split_release_name(spec)
    try:
        if named is not None:
            record = releases.load_release(*named)
            # read on as a local SAE, in the Hugging Face cache: an e2e_sae file, or the directory of
            # a directory format's files
            path, hook = Path(record.metadata["release"]["local"]), None
            path = path if releases.get_release(named[0]).converter.format == "e2e_sae" else path.parent
            found = formats.detect_format(path)
        else:
            path, hook = formats.split_hook(spec)
            path = Path(path)
            found = formats.detect_format(path)
            record = formats.load(path, hook)
    except ValueError as error:
        raise ConfigError(f"{spec}: {error}") from None
    hook = hook or record.metadata.get("hook")
    if not hook:
        raise ConfigError(f"{spec}: the SAE does not say which hook it reads; give it as {path}@HOOK")
    sae = E2ESAE.from_record(record)
    sae.metadata.setdefault("hook", hook)
    if "release" in sae.metadata:  # the fine-tune's checkpoints and output are new SAEs, not the release
        sae.metadata["from_release"] = sae.metadata.pop("release")
    tokens, loss, model, final_lr = None, None, record.metadata.get("model"), None
    directory = None
    if found in ("fastsae-run", "fastsae-checkpoint"):
        checkpoint = ckpt.latest_checkpoint(path) if found == "fastsae-run" else path
        run_dir = checkpoint.parent.parent
        fmt, directory = "fastsae", checkpoint / runs.SAE_DIR / hook
        if (run_dir / runs.RUN_CONFIG).is_file():
            config = ckpt.load_run_config(run_dir)
            loss, model = config.to_dict()["loss"], config.model.name
            final_lr = config.optim.lr * config.optim.min_lr_factor
            tokens = _checkpoint_step(checkpoint) * config.tokens_per_step
    elif found == "e2e_sae":
        fmt = "fastsae"  # read only: written back in fastsae's format
        tokens, loss, final_lr = _e2e_sae_training(path)
    else:
        directory = Path(record.source)
        directory = directory if directory.is_dir() else directory.parent
        fmt = formats.detect_format(directory)
        if fmt == "saelens":
            config = read_json_object(directory / formats.CONFIG_NAME)
            value = config.get("training_tokens", (config.get("metadata") or {}).get("training_tokens"))
            tokens = int(value) if isinstance(value, (int, float)) and value > 0 else None
    return Source(spec, path, hook, fmt, found, directory, sae, tokens, loss, model, final_lr)


def _checkpoint_step(checkpoint: Path) -> int:
    try:
        return int(checkpoint.name.removeprefix("step_"))
    except ValueError:
        return int(torch.load(checkpoint / runs.STATE_FILE, map_location="cpu", weights_only=False)["step"])


def _e2e_sae_training(path: Path) -> tuple[int | None, dict | None, float | None]:
    """(training tokens, loss coefficients in fastsae's names, final learning rate) from e2e_sae's
    final_config.yaml (its cosine schedule ends at lr x min_lr_factor)."""
    import yaml

    config_path = (path if path.is_dir() else path.parent) / "final_config.yaml"
    if not config_path.is_file():
        return None, None, None
    config = yaml.safe_load(config_path.read_text()) or {}
    n_ctx = (config.get("train_data") or {}).get("n_ctx")
    tokens = config["n_samples"] * n_ctx if config.get("n_samples") and n_ctx else None
    final_lr = None
    if isinstance(config.get("lr"), (int, float)) and config.get("lr_schedule", "cosine") == "cosine":
        final_lr = float(config["lr"]) * float(config.get("min_lr_factor", 1.0))
    loss = config.get("loss")
    if not isinstance(loss, dict):
        return tokens, None, final_lr

    def coeff(name):
        return float(((loss.get(name) or {}).get("coeff")) or 0.0)

    in_to_orig = loss.get("in_to_orig") or {}
    return tokens, {"sparsity_coeff": coeff("sparsity"), "sparsity_p": float((loss.get("sparsity") or {}).get(
                        "p_norm", 1.0)), "kl_coeff": coeff("logits_kl"), "local_mse_coeff": coeff("out_to_in"),
                    "downstream_coeff": float(in_to_orig.get("total_coeff") or 0.0)}, final_lr


# ------------------------------------------------------------------------------------ the config

def finetune_config(sources: list[Source], *, model: str | None = None, config: str | None = None,
                    overrides: list[str] | None = None, tokens: float | None = None,
                    fraction: float | None = None) -> tuple[TrainConfig, dict]:
    """The fine-tune's TrainConfig and what decided it ({"preset", "budget", "coefficients", "lr",
    "notes"}).

    Layers, last wins: the preset (config, else the model family's: PRESETS), the SAEs (hooks,
    kind, size), the source run's loss with its reconstruction term replaced by the balanced KL +
    MSE (see fastsae.train.finetune), the learning rate the source run's schedule ended at (else
    the preset's), the budget (tokens, else fraction of the source's training tokens, else
    PAPER_SHARE of them, else the preset's), then ``overrides`` (--set)."""
    notes = []
    try:
        model = formats.one_model((s.model for s in sources), model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    preset = config or PRESETS.get(model)
    if preset is None:
        raise ConfigError(f"no fine-tune preset for model {model!r} (presets: {', '.join(sorted(PRESETS.values()))}); "
                          "give --config PRESET_OR_YAML for its data, eval and optimizer settings")
    import yaml

    data = yaml.safe_load(resolve_config_path(preset).read_text()) or {}
    base = load_config(dict(data))
    data["model"] = {**data.get("model", {}), "name": model}
    data["saes"] = {**data.get("saes", {}), **_saes_section(sources)}
    data["loss"], coefficients = _loss_section(sources, base, notes)
    data.setdefault("optim", {})
    lr = {"value": base.optim.lr, "from": "preset"}
    final_lrs = {s.final_lr for s in sources}
    if len(final_lrs) == 1 and None not in final_lrs:  # the paper: 5e-5, where GPT-2-size runs end
        lr = {"value": final_lrs.pop(), "from": "the source run's final lr"}
        data["optim"]["lr"] = lr["value"]
    budget = _budget(sources, base, tokens, fraction, notes)
    data["optim"]["n_tokens"] = budget["tokens"]
    try:
        final = TrainConfig.from_dict(apply_overrides(data, list(overrides or [])))
    except ConfigError as error:
        raise ConfigError(f"fine-tune config (preset {preset}): {error}") from None
    budget["tokens"] = final.optim.n_tokens  # --set has the last word
    if final.optim.lr != lr["value"]:
        lr = {"value": final.optim.lr, "from": "--set"}
    return final, {"preset": preset, "budget": budget, "coefficients": coefficients, "lr": lr, "notes": notes}


def _saes_section(sources: list[Source]) -> dict:
    """hooks and the SAEs' kind and size: one kind and size per run (config.yaml describes them, and
    a resume builds its SAEs from it)."""
    hooks = [s.hook for s in sources]
    if len(set(hooks)) != len(hooks):
        raise ConfigError(f"two SAEs for one hook: {hooks}")
    specs = {(s.sae.spec.activation, s.sae.n_latents, s.sae.spec.decoder_norm,
              json.dumps(s.sae.spec.hyperparameters(), sort_keys=True), str(s.sae.dtype)) for s in sources}
    if len(specs) > 1:
        raise ConfigError("one fine-tune trains SAEs of one kind, size and decoder norm (its config describes "
                          f"them); these differ: {sorted(specs)}. Fine-tune them in separate runs")
    spec = sources[0].sae.spec
    params = spec.hyperparameters()
    k = params.pop("k", None)
    return {"hooks": hooks, "activation": spec.activation, "k": k, "params": params, "n_latents": spec.n_latents,
            "ratio": None, "decoder_norm": spec.decoder_norm, "dtype": dtype_name(sources[0].sae.dtype)}


def _loss_section(sources: list[Source], base: TrainConfig, notes: list[str]) -> tuple[dict, dict]:
    """The loss: the preset's, with the source's kind terms and reconstruction scale (see the
    module docstring); and {coefficient: where it came from}."""
    loss = base.to_dict()["loss"]
    loss.update(downstream_coeff=0.0, downstream_hooks=[], downstream_coeffs=None)
    trained = [s.loss for s in sources if s.loss is not None]
    where = {key: "preset" for key in ("sparsity_coeff", "kl_coeff", "local_mse_coeff", "auxk_coeff")}
    if trained:
        if len({json.dumps(t, sort_keys=True) for t in trained}) > 1 or len(trained) < len(sources):
            raise ConfigError("the SAEs were trained with different losses; fine-tune them in separate runs")
        source = trained[0]
        for key in KIND_LOSS_KEYS:
            if key in source:
                loss[key] = source[key]
                where[key] = "source run"
        if source.get("local_mse_coeff", 0) > 0:  # a local (MSE) run: the MSE sets the scale
            loss.update(balance="mse", local_mse_coeff=source["local_mse_coeff"])
            where["local_mse_coeff"] = "source run (the scale)"
        elif source.get("kl_coeff", 0) > 0:  # an e2e run: the KL sets the scale
            loss.update(balance="kl", kl_coeff=source["kl_coeff"])
            where["kl_coeff"] = "source run (the scale)"
    else:
        loss["balance"] = loss.get("balance") or "mse"
        if all(s.sae.k is not None for s in sources):
            loss["sparsity_coeff"] = 0.0
            where["sparsity_coeff"] = "0: its kind selects k latents per token (no penalty in SAELens, sparsify)"
        else:
            notes.append(f"the SAE files do not record the sparsity coefficient they were trained with: the "
                         f"preset's loss.sparsity_coeff={loss['sparsity_coeff']:g} is used (--set "
                         "loss.sparsity_coeff=... for another)")
    for source in sources:
        sae = source.sae
        if sae.spec.decoder_norm == "project":
            norms = sae.W_dec.detach().float().norm(dim=1)
            if float((norms - 1).abs().max()) > 1e-3:
                notes.append(f"{source.spec}: decoder rows of norms {float(norms.min()):.3g}..{float(norms.max()):.3g}; "
                             "decoder_norm 'project' makes them unit norm at the first step (a change of "
                             "function the 'before' metrics do not see)")
    return loss, {key: {"value": loss[key], "from": where[key]} for key in where} | {"balance": loss["balance"]}


def _budget(sources: list[Source], base: TrainConfig, tokens, fraction, notes) -> dict:
    if tokens is not None and fraction is not None:
        raise ConfigError("give --tokens or --fraction, not both")
    known = [s.training_tokens for s in sources]
    trained = max(known) if all(t is not None for t in known) else None
    if tokens is not None:
        if not tokens >= 1:
            raise ConfigError(f"--tokens must be at least 1, got {tokens!r}")
        return {"tokens": int(tokens), "from": "--tokens", "source_training_tokens": trained}
    if fraction is not None and not fraction > 0:
        raise ConfigError(f"--fraction must be above 0, got {fraction!r}")
    if trained is None:
        if fraction is not None:
            raise ConfigError("--fraction needs the SAEs' training tokens, which their files do not record; give "
                              "--tokens N")
        notes.append(f"the SAE files do not record their training tokens: the preset's budget, "
                     f"{base.optim.n_tokens:,} tokens")
        return {"tokens": base.optim.n_tokens, "from": "preset", "source_training_tokens": None}
    share = PAPER_SHARE if fraction is None else fraction
    return {"tokens": max(1, math.ceil(share * trained)), "from": f"{share:g} of the source's training tokens"
            + (" (the paper's share)" if fraction is None else ""), "source_training_tokens": trained}


__all__ = ["KIND_LOSS_KEYS", "PAPER_SHARE", "PRESETS", "Source", "finetune_config", "load_source"]
