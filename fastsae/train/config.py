"""The training configuration: a tree of dataclasses, loaded from YAML, with --set overrides.

    cfg = load_config("e2e-gpt2", overrides=["optim.lr=1e-4", "saes.hooks=[blocks.4.hook_resid_pre]"])

A config names a preset (a YAML file shipped in fastsae/configs/) or a path to a YAML file. Every
key is checked: an unknown key is reported with the keys allowed in its section, a bad value with
the allowed values or range. Missing keys take the defaults below. The resolved config is saved as
config.yaml in the run directory, which is what `--resume` and `fastsae eval` read back.

This file is longer than the house's ~400 lines because every key carries its check and its help
text beside its default, and the loader that checks them is here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastsae._dtypes import DTYPE_NAMES as DTYPES
from fastsae.activations import ACTIVATION_NAMES, get_activation
from fastsae.spec import DECODER_NORMS, INITS, check_params, hook_in_out

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


# Keys that were renamed: old dotted key -> new one. A config (file, dict or --set) that gives the old
# key is read as the new one, with a DeprecationWarning; one mapping giving both with different
# values is an error naming both. Run directories written before a rename keep resuming.
RENAMED_KEYS = {"data.kind": "data.source"}


def _field(default, *, choices=None, low=None, high=None, help=""):
    """A dataclass field with the checks the loader applies (choices, inclusive range)."""
    meta = {"choices": choices, "low": low, "high": high, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _field("embedded", help='TransformerLens/HF name ("gpt2"), a local model directory, or "embedded"')
    dtype: str = _field("float32", choices=DTYPES, help="dtype of the frozen LM's weights")
    api: str = _field("auto", choices=("auto", "bridge", "hooked"), help="TransformerLens API")


@dataclass
class SAEConfig:
    hooks: list[str] = _field(["blocks.1.hook_resid_pre"], help="hook points, one SAE each; IN->OUT for a "
                              "transcoder that reads IN and replaces OUT (e.g. "
                              "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out)")
    n_latents: int | None = _field(None, low=1, help="dictionary size; null: ratio * d_in")
    ratio: float | None = _field(60.0, low=0, help="n_latents / d_in when n_latents is null (the paper's dict_size_to_input_ratio)")
    activation: str = _field("relu", choices=ACTIVATION_NAMES, help="the SAE activation (fastsae.activations)")
    k: int | float | None = _field(None, low=0, help="active latents per token (topk; batchtopk and "
                                                     "matryoshka_batchtopk: on average over the batch)")
    params: dict[str, int | float | bool | str | list[int]] = _field(
        {}, help="the activation's other hyperparameters, e.g. {bandwidth: 0.001, init_threshold: 0.001} for "
                 "jumprelu, {threshold_lr: 0.01} for batchtopk, {widths: [128, 512]} for matryoshka_batchtopk")
    decoder_norm: str = _field("forward", choices=DECODER_NORMS)
    init: str = _field("auto", choices=("auto", *INITS),
                       help="parameter init (E2ESAE's init=); auto: the activation's (paper for relu and jumprelu, "
                            "topk for topk and batchtopk)")
    init_encoder_as_decoder_transpose: bool = _field(False)
    skip: bool = _field(False, help="transcoders (hooks IN->OUT) with an affine skip path W_skip [d_in, d_out] "
                                    "(skip-transcoders)")
    dtype: str = _field("float32", choices=DTYPES, help="dtype the SAE parameters are stored and run in")
    shards: int = _field(1, low=1, help="ranks each SAE's latents are split across under torchrun (must divide "
                                        "the number of processes and n_latents); 1: every rank holds whole SAEs")


@dataclass
class LossConfig:
    # Every term is coefficient * term; a term with coefficient 0 is not computed.
    sparsity_coeff: float = _field(1.5, low=0, help="Lp norm of the code, mean over tokens, / d_in")
    sparsity_p: float = _field(1.0, low=0, high=2, help="p of the sparsity Lp norm (0 < p <= 2)")
    kl_coeff: float = _field(1.0, low=0, help="KL(p_orig || p_sae) of the output distributions, mean over tokens")
    local_mse_coeff: float = _field(0.0, low=0, help="MSE of the SAE output vs its input, mean over elements")
    downstream_coeff: float = _field(0.0, low=0, help="total coefficient of the downstream MSE, split evenly over downstream_hooks")
    downstream_hooks: list[str] = _field([], help="later hook points whose activations must match the clean run (e2e+ds)")
    downstream_coeffs: list[float] | None = _field(None, help="per-hook coefficients instead of the even split")
    auxk_coeff: float = _field(1 / 32, low=0, help="AuxK loss on dead latents (the selection kinds: topk, batchtopk, "
                                                   "matryoshka_batchtopk)")
    auxk_k: int | None = _field(None, low=1, help="dead latents that reconstruct the residual; null: d_in // 2")
    balance: str | None = _field(
        None, choices=(None, "mse", "kl"),
        help="Karvonen 2025's KL + MSE balance (`fastsae finetune`): each step the KL and the local MSE get weights "
             "that make their two halves equal in value, (mse) 0.5 x local_mse_coeff x (MSE + kl_coeff x (MSE/KL) "
             "x KL) or (kl) 0.5 x kl_coeff x (KL + local_mse_coeff x (KL/MSE) x MSE), the ratio detached: the "
             "reconstruction term keeps the scale of the loss named, so a sparsity coefficient tuned against it "
             "keeps its meaning; the other coefficient scales its half (1: the paper's equal halves). null: the "
             "fixed coefficients")


@dataclass
class DataConfig:
    # source and the keys set below (not null) form the spec for fastsae.train.data.build_token_stream;
    # each source takes only some of them (see SPEC_KEYS there). Older configs and run directories
    # name it data.kind: still read, with a DeprecationWarning (RENAMED_KEYS below).
    source: str = _field("embedded", choices=("embedded", "hf", "text", "tokens"),
                         help="where tokens come from: the embedded corpus, a Hugging Face dataset, text files, "
                              "token files (formerly data.kind)")
    path: str | None = _field(None, help="text / tokens: a file, a directory or a glob")
    name: str | None = _field(None, help="hf: the dataset (hub name, builder, or a saved dataset dir)")
    config: str | None = _field(None, help="hf: the dataset's config (subset)")
    split: str | None = _field(None, help="hf: the training split (default train)")
    eval_split: str | None = _field(None, help="hf: the held-out split (default: the training split)")
    eval_examples: int | None = _field(None, low=1, help="hf: hold out the first N examples of a split shared by train and eval")
    column: str | None = _field(None, help="hf: the column to read (default: input_ids or tokens as token ids, "
                                           "else text); text: the field of .jsonl records (default text)")
    streaming: bool | None = _field(None, help="hf: stream instead of downloading (default true)")
    data_files: str | list[str] | dict[str, str | list[str]] | None = _field(
        None, help="hf: data_files for builders like json/parquet: a path, a list, or split -> path(s)")
    shuffle_buffer: int | None = _field(None, low=1, help="hf: seeded shuffle buffer, in examples")
    dtype: str | None = _field(None, help="tokens: dtype of raw .bin files (required for them: uint16, uint32, ...)")
    eval_fraction: float | None = _field(None, low=0, high=1, help="text / tokens: the held-out tail (default 0.05)")
    context_length: int = _field(128, low=2, help="tokens per sample")
    prepend_bos: bool = _field(False, help="start every sample with the tokenizer's BOS (then context_length - 1 "
                                           "data tokens); off: the packed data as it is")


@dataclass
class OptimConfig:
    n_tokens: int = _field(1_000_000, low=1, help="training tokens; steps = n_tokens / (batch_size * context_length)")
    batch_size: int = _field(16, low=1, help="samples per optimizer step (the effective batch)")
    grad_accum: int = _field(1, low=1, help="micro-batches per step; must divide batch_size")
    lr: float = _field(5e-4, low=0)
    betas: list[float] = _field([0.9, 0.999])
    warmup_samples: int = _field(20_000, low=0, help="linear warmup, in samples")
    min_lr_factor: float = _field(0.1, low=0, high=1, help="cosine decay ends at lr * min_lr_factor")
    max_grad_norm: float | None = _field(10.0, low=0, help="clip the SAE parameters' gradient norm; null: no clipping")


@dataclass
class EvalConfig:
    every: int = _field(0, low=0, help="steps between eval passes (0: only at the end)")
    n_tokens: int = _field(65_536, low=1, help="held-out tokens per eval pass")
    batch_size: int = _field(8, low=1)


@dataclass
class LogConfig:
    every: int = _field(10, low=1, help="steps between metrics.jsonl / wandb records")
    dead_window_tokens: int = _field(1_000_000, low=1, help="a latent is dead if it has not fired in this many tokens")
    progress: bool = _field(True, help="tqdm progress bar")


@dataclass
class WandbConfig:
    project: str | None = _field(None, help="log to this wandb project (needs `pip install wandb`); null: no wandb")
    entity: str | None = _field(None)
    name: str | None = _field(None, help="run name; null: the config's name")
    mode: str = _field("online", choices=("online", "offline", "disabled"))
    tags: list[str] = _field([])


@dataclass
class CheckpointConfig:
    every: int = _field(0, low=0, help="steps between checkpoints (0: only at the end and on interrupt)")
    every_minutes: float = _field(10.0, low=0, help="also checkpoint when this many minutes of training passed "
                                                    "since the last one (0: off), so a kill -9 loses at most that")
    keep: int = _field(1, low=1, help="checkpoints kept (the newest ones)")


@dataclass
class TrainConfig:
    name: str = _field("run")
    seed: int = _field(0)
    device: str = _field("auto", help='"auto" (cuda if available), "cpu", "cuda", "cuda:1", ...')
    amp: str | None = _field(None, choices=(None, "bf16"), help="bf16 autocast for the LM passes (the SAE stays in its dtype)")
    matmul_precision: str = _field(
        "high", choices=("highest", "high", "medium"),
        help="fp32 matmuls on CUDA (torch.set_float32_matmul_precision, read by cuBLAS and the Triton kernels): "
             "high = TF32 tensor cores (10-bit mantissa operands, fp32 accumulation), highest = full fp32 on CUDA "
             "cores (several times slower), medium = operands rounded to bf16 (8-bit mantissa); CPU runs ignore it")
    run_dir: str | None = _field(None, help="null: runs/<name>-<time>")
    model: ModelConfig = field(default_factory=ModelConfig)
    saes: SAEConfig = field(default_factory=SAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # ------------------------------------------------------------------ derived values

    @property
    def tokens_per_step(self) -> int:
        return self.optim.batch_size * self.data.context_length

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.optim.n_tokens / self.tokens_per_step))

    @property
    def warmup_steps(self) -> int:
        # rounded down, as the paper's code: warmup_samples // effective_batch_size
        return self.optim.warmup_samples // self.optim.batch_size

    @property
    def is_e2e(self) -> bool:
        """Whether training needs the spliced run (KL or downstream terms), or only the SAE inputs."""
        return self.loss.kl_coeff > 0 or self.loss.downstream_coeff > 0

    def data_spec(self) -> dict:
        """The spec for build_token_stream: source and the data keys that are set."""
        spec = dataclasses.asdict(self.data)
        del spec["context_length"]
        return {key: value for key, value in spec.items() if value is not None}

    def downstream_weights(self) -> dict[str, float]:
        hooks = self.loss.downstream_hooks
        if not hooks or self.loss.downstream_coeff == 0:
            return {}
        if self.loss.downstream_coeffs is not None:
            return dict(zip(hooks, self.loss.downstream_coeffs))
        return {h: self.loss.downstream_coeff / len(hooks) for h in hooks}

    # ------------------------------------------------------------------ (de)serialization

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        config = _build(cls, rename_old_keys(data), "")
        config.validate()
        return config

    def validate(self) -> None:
        """Checks that span several keys (single keys are checked while building)."""
        s, loss, optim = self.saes, self.loss, self.optim
        if not s.hooks:
            raise ConfigError("saes.hooks: give at least one hook point")
        if len(set(s.hooks)) != len(s.hooks):
            raise ConfigError(f"saes.hooks: each hook at most once, got {s.hooks}")
        try:
            plain = [hook for hook in s.hooks if len(set(hook_in_out(hook))) == 1]
        except ValueError as error:
            raise ConfigError(f"saes.hooks: {error}") from None
        if s.skip and plain:
            raise ConfigError(f"saes.skip: a skip path is a transcoder's (hooks IN->OUT); {plain} are SAE hooks")
        if s.n_latents is None and not s.ratio:
            raise ConfigError("saes.n_latents or saes.ratio must be set (the dictionary size)")
        kind = get_activation(s.activation)
        try:  # k against n_latents waits for the model's width where the size is a ratio (Trainer)
            check_params(kind, s.k, s.params, s.n_latents)
        except ValueError as error:
            raise ConfigError(f"saes.activation={s.activation!r}: {error} (hyperparameters: saes.k, "
                              "saes.params)") from None
        if not 0 < loss.sparsity_p <= 2:
            raise ConfigError(f"loss.sparsity_p must be in (0, 2], got {loss.sparsity_p}")
        if not kind.sparsity_uses_p and loss.sparsity_p != 1:
            raise ConfigError(f"loss.sparsity_p={loss.sparsity_p} does not apply to saes.activation={s.activation!r}, "
                              "whose sparsity term is not an Lp norm (see its module in fastsae.activations)")
        if loss.downstream_coeff > 0 and not loss.downstream_hooks:
            raise ConfigError("loss.downstream_hooks: give the later hook points for loss.downstream_coeff > 0")
        if loss.downstream_coeffs is not None:
            if len(loss.downstream_coeffs) != len(loss.downstream_hooks):
                raise ConfigError(f"loss.downstream_coeffs must have one value per downstream hook "
                                  f"({len(loss.downstream_hooks)}), got {len(loss.downstream_coeffs)}")
            if any(c < 0 for c in loss.downstream_coeffs):
                raise ConfigError(f"loss.downstream_coeffs must be >= 0, got {loss.downstream_coeffs}")
        if loss.balance is not None and not (loss.kl_coeff > 0 and loss.local_mse_coeff > 0):
            raise ConfigError(f"loss.balance={loss.balance!r} balances the KL against the local MSE: set both "
                              f"loss.kl_coeff and loss.local_mse_coeff above 0 (got {loss.kl_coeff:g} and "
                              f"{loss.local_mse_coeff:g})")
        if loss.kl_coeff == 0 and loss.downstream_coeff == 0 and loss.local_mse_coeff == 0:
            raise ConfigError("the loss has no reconstruction term: set loss.kl_coeff, loss.local_mse_coeff "
                              "or loss.downstream_coeff above 0")
        if optim.batch_size % optim.grad_accum:
            raise ConfigError(f"optim.grad_accum={optim.grad_accum} must divide optim.batch_size={optim.batch_size}")
        if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
        spec_keys = _data_spec_keys().get(self.data.source)
        if spec_keys is not None:
            for key, value in self.data_spec().items():
                if key not in spec_keys:
                    raise ConfigError(f"data.{key} is not used by data.source={self.data.source!r}; "
                                      f"its keys: {', '.join(sorted(spec_keys - {'source'})) or 'none'}")
            if self.data.source in ("text", "tokens") and self.data.path is None:
                raise ConfigError(f"data.path is required for data.source={self.data.source!r}")
            if self.data.source == "hf" and self.data.name is None:
                raise ConfigError("data.name (the dataset) is required for data.source='hf'")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


def _data_spec_keys() -> dict:
    try:
        from fastsae.train.data import SPEC_KEYS
    except ImportError:
        return {}
    return SPEC_KEYS


# ---------------------------------------------------------------------- building and checking

def _deprecated(old: str, new: str, stacklevel: int, override: bool = False) -> None:
    message = (f"--set {old}=... is deprecated: it is now --set {new}=... (read as {new})" if override else
               f"config key {old} is deprecated: it is now {new} (read as {new}; rename it in the config)")
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)


def rename_old_keys(data, where: str = "the config"):
    """`data` (a nested config mapping) with the RENAMED_KEYS given under their old names moved to
    the new ones (a DeprecationWarning each); the mappings that change are copied, not edited."""
    if not isinstance(data, dict):
        return data
    for old, new in RENAMED_KEYS.items():
        *section, old_leaf = old.split(".")
        new_leaf = new.split(".")[-1]
        node = data
        for part in section:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        if new_leaf in node and node[new_leaf] != node[old_leaf]:
            raise ConfigError(f"{where} gives both {old}={node[old_leaf]!r} and {new}={node[new_leaf]!r}; "
                              f"{old} is the old name of {new}: keep only {new}")
        _deprecated(old, new, stacklevel=3)
        renamed = {(new_leaf if key == old_leaf else key): value for key, value in node.items()
                   if not (key == old_leaf and new_leaf in node)}
        data = _replace_at(data, section, renamed)
    return data


def _replace_at(data: dict, path: list[str], value) -> dict:
    """A copy of `data` with the mapping at `path` replaced by `value` (the parents copied)."""
    if not path:
        return value
    return {**data, path[0]: _replace_at(data[path[0]], path[1:], value)}


def _build(cls, data, path: str):
    where = path.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key '{path}{unknown[0]}'; allowed keys in {where}: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{path}{name}.")
        else:
            values[name] = _check_value(f"{path}{name}", value, hint, fields[name].metadata)
    return cls(**values)


def _check_value(key: str, value, hint, meta):
    value = _coerce(key, value, hint)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join("null" if c is None else repr(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {shown}")
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {span}")
    return value


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        key_hint, item = typing.get_args(hint)
        return f"a mapping of {_type_name(key_hint)} to {_type_name(item)}"
    return "null" if hint is type(None) else hint.__name__


def _coerce(key: str, value, hint):
    """value as type hint, or a ConfigError naming the key and the expected type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(hint)
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_hint, item = typing.get_args(hint)
            return {_coerce(key, k, key_hint): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads "4.1e8" as a string, "4.1e+8" as a float
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {type(value).__name__}: {value!r}")


# ---------------------------------------------------------------------- presets, files, overrides

def list_presets() -> dict[str, str]:
    """Preset name -> its first comment line (a one-line description)."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        presets[path.stem] = first.lstrip("# ").strip()
    return presets


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or the shipped preset of that name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"no config file at {path}")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"{name_or_path!r} is neither a config file nor a preset; "
                          f"presets: {', '.join(list_presets())}")
    return preset


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply "dotted.key=yaml value" overrides to a nested dict (in place; returns it)."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=1e-4")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in RENAMED_KEYS:
            _deprecated(key, RENAMED_KEYS[key], stacklevel=2, override=True)
            key = RENAMED_KEYS[key]
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key}: cannot parse {text!r} as YAML ({error})") from None
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(name_or_path: str | Path | dict, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a preset name, a YAML file or a dict, with --set style overrides."""
    if isinstance(name_or_path, dict):
        data = dict(name_or_path)
    else:
        path = resolve_config_path(str(name_or_path))
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
    # old key names are moved before the overrides, so a --set of the new name overrides a file's old one
    where = "the config" if isinstance(name_or_path, dict) else str(path)
    return TrainConfig.from_dict(apply_overrides(rename_old_keys(data, where), overrides or []))
