"""What a run is made of, built from its config: device, model, SAEs, data, optimizer.

The trainer, the evaluator (`fastsae eval`, sweeps) and the tools that read runs build their parts
here, so one config means one model, one set of SAEs and one data stream everywhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastsae import distributed
from fastsae._dtypes import DTYPES
from fastsae.sae import E2ESAE
from fastsae.sharded import ShardedE2ESAE
from fastsae.spec import SAESpec, hook_in_out
from fastsae.train.config import ConfigError, TrainConfig


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


def load_language_model(cfg: TrainConfig, model, device: torch.device):
    """(LanguageModel, device): the config's model, or the one given (a LanguageModel, a
    TransformerLens model, a name or directory). A given model's device wins over "auto"."""
    from fastsae.model.lm import LanguageModel

    if model is None or isinstance(model, (str, Path)):
        lm = LanguageModel.load(str(model or cfg.model.name), device=device, dtype=DTYPES[cfg.model.dtype],
                                api=cfg.model.api)
        return lm, device
    if isinstance(model, LanguageModel):
        if model.device != device and cfg.device != "auto":
            raise ValueError(f"the model is on {model.device} but config.device is {cfg.device!r}")
        return model, model.device
    lm = LanguageModel.wrap(model)
    return lm, lm.device


def sae_spec(cfg: TrainConfig, d_in: int, d_out: int | None = None, transcoder: bool = False) -> SAESpec:
    """The spec of the config's SAEs (transcoder: of its transcoders, which take saes.skip) reading
    width d_in and writing d_out (None: d_in); a ConfigError names a bad key."""
    s = cfg.saes
    n_latents = s.n_latents or int(round(s.ratio * d_in))
    try:
        return SAESpec.create(d_in, n_latents, s.activation, k=s.k, params=s.params, decoder_norm=s.decoder_norm,
                              init=None if s.init == "auto" else s.init,
                              init_encoder_as_decoder_transpose=s.init_encoder_as_decoder_transpose, d_out=d_out,
                              skip=s.skip and transcoder)
    except ValueError as error:
        size = "" if s.n_latents else f" (n_latents = saes.ratio={s.ratio:g} x d_model={d_in})"
        raise ConfigError(f"config: saes: {error}{size}") from None


def hook_widths(lm, hooks: list[str]) -> dict[str, tuple[int, int]]:
    """{hook: (d_in, d_out)}: d_model for an SAE (it reads the residual width); a transcoder's two
    widths measured on one two-token run (an MLP's hidden layer, say, is d_mlp wide)."""
    pairs = {hook: hook_in_out(hook) for hook in hooks}
    transcoders = [name for hook_in, hook_out in pairs.values() if hook_in != hook_out for name in (hook_in, hook_out)]
    measured = lm.activation_widths(transcoders) if transcoders else {}
    return {hook: (lm.d_model, lm.d_model) if hook_in == hook_out else (measured[hook_in], measured[hook_out])
            for hook, (hook_in, hook_out) in pairs.items()}


def build_saes(cfg: TrainConfig, hooks: list[str], lm, layout, device: torch.device,
               saes: dict | None = None) -> dict[str, E2ESAE]:
    """One SAE per hook, on ``device``: fresh ones drawn from the config's seed (so two runs of one
    config start equal), or the caller's (E2ESAE objects, paths E2ESAE.from_pretrained reads, or
    released SAEs as "RELEASE:ID"). A transcoder hook "IN->OUT" gets a transcoder reading IN's
    width and writing OUT's (hook_widths), with a skip path where saes.skip is set.
    With saes.shards > 1 each rank keeps its block of every SAE (ShardedE2ESAE)."""
    widths = hook_widths(lm, hooks)
    sharded = layout.shards > 1
    coefficients = {name: getattr(cfg.loss, name) for name in ("sparsity_coeff", "auxk_coeff", "local_mse_coeff",
                                                                "kl_coeff")}

    def check_runs(kinds):
        """Each kind's refusals of this run (AuxK with sharded SAEs, ...), as config errors."""
        for kind in kinds:
            try:
                kind.check_run(shards=layout.shards, coefficients=coefficients)
            except ValueError as error:
                raise ConfigError(f"config: {error}") from None

    if saes is None:
        specs = {hook: sae_spec(cfg, *widths[hook], transcoder=hook_in_out(hook)[0] != hook_in_out(hook)[1])
                 for hook in hooks}
        check_runs([spec.kind(spec.params) for spec in specs.values()])  # before drawing large dictionaries
        dtype = DTYPES[cfg.saes.dtype]
        torch.manual_seed(cfg.seed)
        saes = {}
        for hook in hooks:
            spec = specs[hook]
            metadata = {"hook": hook, "model": cfg.model.name, "run": cfg.name}
            try:
                saes[hook] = (ShardedE2ESAE.drawn(layout, spec, metadata=metadata, dtype=dtype, device=device)
                              if sharded else E2ESAE.from_spec(spec, metadata=metadata, dtype=dtype, device=device))
            except ValueError as error:  # this rank's block of the whole init, never the whole dictionary
                raise ConfigError(f"config: saes.shards: {error}") from None
    if sorted(saes) != sorted(hooks):
        raise ValueError(f"saes must have one SAE per hook in config.saes.hooks {hooks}, got {sorted(saes)}")
    # A path (a released SAE in any format E2ESAE.from_pretrained reads) is loaded for its hook.
    saes = {hook: E2ESAE.from_pretrained(sae, hook=hook) if isinstance(sae, (str, Path)) else sae
            for hook, sae in saes.items()}
    for hook, sae in saes.items():
        d_in, d_out = widths[hook]
        if hook_in_out(hook)[0] == hook_in_out(hook)[1] and sae.d_in != d_in:
            raise ValueError(f"saes[{hook!r}] reads d_in={sae.d_in} but the model's d_model is {d_in}")
        if (sae.d_in, sae.d_out) != (d_in, d_out):
            raise ValueError(f"saes[{hook!r}] reads d_in={sae.d_in} and writes d_out={sae.d_out}, but the model's "
                             f"hooks {hook!r} are {d_in} and {d_out} wide")
    check_runs([sae.activation_fn for sae in saes.values()])
    if sharded:  # whole SAEs given by the caller: each rank keeps its block
        try:
            saes = {hook: sae if isinstance(sae, ShardedE2ESAE) else ShardedE2ESAE.from_full(sae, layout)
                    for hook, sae in saes.items()}
        except ValueError as error:
            raise ConfigError(f"config: saes.shards: {error}") from None
    return {hook: saes[hook].to(device) for hook in hooks}


def build_stream(cfg: TrainConfig, lm, split: str, batch_size: int):
    """The config's token stream of ``split`` ("train" or "eval")."""
    from fastsae.train.data import build_token_stream

    return build_token_stream(cfg.data_spec(), lm.tokenizer, context_length=cfg.data.context_length,
                              batch_size=batch_size, split=split, seed=cfg.seed, vocab_size=lm.d_vocab)


def adapt_data(cfg: TrainConfig, lm, data, batch_size: int, name: str):
    """A user's dataset / eval_dataset as token batches (see fastsae.train.data.as_token_stream)."""
    from fastsae.train.data import as_token_stream

    return as_token_stream(data, lm.tokenizer, context_length=cfg.data.context_length, batch_size=batch_size,
                           seed=cfg.seed, vocab_size=lm.d_vocab, prepend_bos=cfg.data.prepend_bos, name=name,
                           exact_batches=name == "dataset")


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


def build_optimizer(cfg: TrainConfig, params: list, device: torch.device):
    """Adam (torch's fused one on CUDA: one kernel for all parameters) and the paper's schedule,
    whose length is n_samples // batch_size as in the paper's code (the steps run round up)."""
    optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                 fused=True if device.type == "cuda" else None)
    warmup, floor = cfg.warmup_steps, cfg.optim.min_lr_factor
    total = max(1, cfg.optim.n_tokens // cfg.tokens_per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, floor))
    return optimizer, scheduler


def setup_layout(cfg: TrainConfig):
    """This process's place in data groups x shards under torchrun (one process otherwise)."""
    try:
        layout = distributed.setup(cfg.saes.shards)
    except ValueError as error:
        raise ConfigError(f"config: {error}") from None
    if cfg.optim.batch_size % (layout.data_size * cfg.optim.grad_accum):
        raise ConfigError(f"config: optim.batch_size={cfg.optim.batch_size} must be divisible by the data "
                          f"ranks ({layout.data_size} = {layout.world_size} processes / saes.shards="
                          f"{layout.shards}) x optim.grad_accum ({cfg.optim.grad_accum})")
    return layout


def check_hooks(cfg: TrainConfig, lm) -> list[str]:
    """The SAE hooks in the order the model computes them (the spliced run starts at the first; a
    transcoder "IN->OUT" sits where it reads), after checking every SAE, transcoder and downstream
    hook against the model: a transcoder writes a hook no earlier than the one it reads, and no
    two coders read or write the same hook."""
    seen: dict[str, str] = {}
    for hook in cfg.saes.hooks:
        try:
            hook_in, hook_out = hook_in_out(hook)
            for name in dict.fromkeys((hook_in, hook_out)):
                lm.validate_hook(name)
                if name in seen:
                    raise ValueError(f"{name!r} is used by two coders, {seen[name]!r} and {hook!r}")
                seen[name] = hook
            if lm.block_index(hook_out) < lm.block_index(hook_in):
                raise ValueError(f"transcoder {hook!r} writes a hook of an earlier block than the one it reads")
        except ValueError as error:
            raise ConfigError(f"config: saes.hooks: {error}") from None
    for hook in cfg.loss.downstream_hooks:
        try:
            lm.validate_hook(hook)
        except ValueError as error:
            raise ConfigError(f"config: {error}") from None
    return sorted(cfg.saes.hooks, key=lambda hook: lm.block_index(hook_in_out(hook)[0]))
