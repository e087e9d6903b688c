"""fastsae's own SAE directory: cfg.json + sae_weights.safetensors.

cfg.json holds the SAE's spec (fastsae.spec.SAESpec: d_in, n_latents, activation, its
hyperparameters as "params", decoder_norm, init, init_encoder_as_decoder_transpose, d_out and skip
(a transcoder's); "k" repeated at the top level for readers of earlier files), the dtype and the
metadata. The safetensors file holds
exactly the tensors the spec implies (W_enc in SAELens's contiguous [d_in, n_latents] layout).
Files written before params / init were saved load with the activation's defaults (init from
metadata.init where an earlier version put it there).

For SAELens, which reads the same file names, cfg.json also carries `architecture`,
`apply_b_dec_to_input` and `normalize_activations`: `architecture` names no SAELens architecture,
so SAELens refuses the directory (even with n_latents renamed d_sae) with a message that says how
to convert it, rather than loading it as a ReLU SAE that subtracts b_dec and ignores the
forward-pass normalisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastsae._dtypes import dtype_name, parse_dtype
from fastsae._files import atomic_write_text, load_safetensors, read_json_object, require_files, save_safetensors
from fastsae._version import __version__
from fastsae.formats.record import SAERecord, check_tensors
from fastsae.spec import SAESpec

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
FORMAT_NAME = "fastsae.E2ESAE"
SAELENS_REFUSAL = ("fastsae.E2ESAE: not a SAELens SAE; convert it with "
                   "E2ESAE.save_pretrained(path, format='saelens') or `fastsae export`")
_SPEC_KEYS = {"d_in", "n_latents", "activation", "params", "decoder_norm", "init", "init_encoder_as_decoder_transpose",
              "d_out", "skip"}
_CONFIG_KEYS = _SPEC_KEYS | {"format", "fastsae_version", "k", "dtype", "metadata", "architecture",
                             "apply_b_dec_to_input", "normalize_activations"}


def detect(path: Path, config: dict) -> bool:
    return config.get("format") == FORMAT_NAME or "n_latents" in config


def read_hook(path: Path) -> str | None:
    return (read_json_object(path / CONFIG_NAME).get("metadata") or {}).get("hook")


def read(directory: str | os.PathLike) -> SAERecord:
    """The SAE of a directory written by write() (or save_pretrained)."""
    directory = Path(directory)
    config_path, weights_path = require_files(directory, (CONFIG_NAME, WEIGHTS_NAME), "not a saved E2ESAE")
    config = read_json_object(config_path)
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise ValueError(f"{config_path} has unknown keys {sorted(unknown)}; expected {sorted(_CONFIG_KEYS)}")
    metadata = dict(config.get("metadata") or {})
    entries = {key: config[key] for key in _SPEC_KEYS if key in config}
    if "params" not in entries and config.get("k") is not None:  # written before params were saved
        entries["params"] = {"k": config["k"]}
    if "init" not in entries and metadata.get("init") is not None:  # an earlier version kept it there
        entries["init"] = metadata.pop("init")
    spec = SAESpec.from_dict(entries, str(config_path))
    if "params" in config and config.get("k") != spec.k:
        raise ValueError(f"{config_path}: k={config.get('k')!r} disagrees with params {config['params']}")
    tensors = load_safetensors(weights_path)
    check_tensors(weights_path, spec, tensors)
    dtype = parse_dtype(config.get("dtype", "float32"), str(config_path))
    return SAERecord(spec, tensors, metadata, dtype, str(directory))


def write(record: SAERecord, directory: str | os.PathLike) -> Path:
    """cfg.json + sae_weights.safetensors, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu() for name, t in record.tensors.items()}
    save_safetensors(tensors, directory / WEIGHTS_NAME)
    config = {"format": FORMAT_NAME, "fastsae_version": __version__, **record.spec.to_dict(), "k": record.spec.k,
              "dtype": dtype_name(record.dtype), "metadata": record.metadata,
              # for SAELens, which reads this file name too (see the module docstring)
              "architecture": SAELENS_REFUSAL, "apply_b_dec_to_input": False, "normalize_activations": "none"}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
    return directory
