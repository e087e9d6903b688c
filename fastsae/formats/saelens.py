"""SAELens 6.x SAE directories (cfg.json + sae_weights.safetensors), both ways.

fastsae's function, with n_j = ||W_dec[j]||:

    pre = x @ W_enc + b_enc;  code = act(pre)   (fastsae.activations)
    x_hat = sum_j code_j * W_dec[j] / n_j + b_dec   (decoder_norm="forward")
    x_hat = sum_j code_j * W_dec[j] + b_dec         (decoder_norm="project": rows unit norm)

SAELens encodes x - b_dec * apply_b_dec_to_input and decodes code @ W_dec + b_dec.

    in:  W_enc, W_dec, b_dec as stored;  b_enc <- b_enc - b_dec @ W_enc when apply_b_dec_to_input.
         rescale_acts_by_decoder_norm (its code is act(n_j * pre_j), decoded with W_dec[j] / n_j):
         W_enc[:, j] <- n_j W_enc[:, j], b_enc[j] <- n_j b_enc[j], W_dec[j] <- W_dec[j] / n_j.
         Loaded with decoder_norm="project" (the forward uses W_dec as stored, as SAELens does).
         The activation is the registry module that reads the architecture (relu: "standard",
         topk: "topk" and 5.x "standard" with activation_fn "topk", jumprelu: "jumprelu" with its
         threshold, batchtopk: "batchtopk" training files); it takes its own tensors and settings.
         normalize_activations other than "none", hook_z reshaping and other architectures (gated,
         transcoders, ...) are refused with an error naming them.
    out: the activation's architecture and settings (BatchTopK as "jumprelu", as SAELens saves its
         own), apply_b_dec_to_input false, normalize_activations "none", W_enc, b_enc, b_dec as
         they are, W_dec[j] <- W_dec[j] / n_j for decoder_norm="forward" (unit rows; the code is
         unchanged). metadata: hook_name, model_name, and a "fastsae" entry (the spec, metadata)
         that makes the round trip restore the same function, spec and metadata (the stored W_dec
         rows of a decoder_norm="forward" SAE come back unit norm, not at their old scale, which
         matters only to an optimizer that continues training them).

All folds are computed in float64 and then cast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastsae._dtypes import dtype_name, parse_dtype
from fastsae._files import atomic_write_text, load_safetensors, read_json_object, save_safetensors
from fastsae.activations import ACTIVATIONS, get_activation
from fastsae.formats.native import CONFIG_NAME, SAELENS_REFUSAL, WEIGHTS_NAME
from fastsae.formats.record import SAERecord, export_tensors, make_record, require
from fastsae.spec import TRANSCODER_ARROW

# metadata.sae_lens_version of the SAELens files written here: the 6.x format they follow (SAELens
# treats a file without it as pre-6.0 and renames its keys).
SAELENS_FORMAT_VERSION = "6.54.0"
_PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")


def detect(path: Path, config: dict) -> bool:
    return (path / WEIGHTS_NAME).is_file()


def read_hook(path: Path) -> str | None:
    config = read_json_object(path / CONFIG_NAME)
    # SAELens 6 keeps it in metadata; earlier files at the top level, before 3.0 as hook_point
    return (config.get("metadata") or {}).get("hook_name") or config.get("hook_name") or config.get("hook_point")


def _activation_for(config: dict, ours: dict, config_path: Path):
    if isinstance(ours.get("spec"), dict):  # written by fastsae: its own spec names the activation
        return get_activation(ours["spec"].get("activation"))
    readers = [kind for kind in ACTIVATIONS.values() if kind.reads_saelens(config)]
    legacy_fn = config.get("activation_fn_str", config.get("activation_fn"))
    if not readers and legacy_fn not in (None, "relu", "topk"):  # SAELens 5.x: "standard" + activation_fn
        raise ValueError(f"{config_path}: activation_fn {legacy_fn!r} is not supported; fastsae loads its ReLU "
                         "and TopK SAEs")
    if len(readers) != 1:
        architecture = config.get("architecture", "standard")
        known = sorted({a for kind in ACTIVATIONS.values() for a in kind.saelens_architectures})
        raise ValueError(f"{config_path}: SAELens architecture {architecture!r} is not supported; fastsae loads "
                         f"{known}")
    return readers[0]


def read(path: Path) -> SAERecord:
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    config = read_json_object(config_path)
    if config.get("architecture") == SAELENS_REFUSAL:
        raise ValueError(f"{config_path} is a fastsae config edited to look like SAELens's; restore its "
                         "n_latents key, or convert the SAE with save_pretrained(format='saelens')")
    norm = config.get("normalize_activations", "none")
    if norm is False:  # files before SAELens 6 wrote a bool; false meant "none"
        norm = "none"
    if norm not in ("none", None):
        raise ValueError(f"{config_path}: normalize_activations={norm!r} rescales the SAE's input at run time, which "
                         "fastsae does not do; only 'none' loads (fold the normalisation into the weights first)")
    if config.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{config_path}: reshape_activations={config['reshape_activations']!r} (hook_z SAEs read "
                         "per-head activations); fastsae SAEs read [..., d_in] activations only")
    metadata = config.get("metadata") or {}
    ours = metadata.get("fastsae") if isinstance(metadata.get("fastsae"), dict) else {}
    kind = _activation_for(config, ours, config_path)
    file_tensors = load_safetensors(weights_path)
    require(file_tensors, _PARAMETERS, weights_path)
    t = {name: file_tensors[name].to(torch.float64) for name in _PARAMETERS}
    if t["W_enc"].ndim != 2 or t["W_dec"].ndim != 2:
        raise ValueError(f"{weights_path}: W_enc and W_dec must be matrices, got shapes "
                         f"{tuple(t['W_enc'].shape)} and {tuple(t['W_dec'].shape)}")
    for key, axis in (("d_in", 0), ("d_sae", 1)):
        if key in config and config[key] != t["W_enc"].shape[axis]:
            raise ValueError(f"{config_path}: {key}={config[key]} but W_enc has shape {tuple(t['W_enc'].shape)}")
    if t["b_dec"].shape != (t["W_enc"].shape[0],):
        raise ValueError(f"{weights_path}: b_dec has shape {tuple(t['b_dec'].shape)}, "
                         f"expected ({t['W_enc'].shape[0]},)")
    if config.get("apply_b_dec_to_input", True):  # its encoder reads x - b_dec
        t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]
    if config.get("rescale_acts_by_decoder_norm", False):
        # it codes act(n_j * pre_j) and decodes with W_dec[j] / n_j (all-zero rows stay zero)
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-12)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    others = {name: tensor.to(torch.float64) for name, tensor in file_tensors.items() if name not in _PARAMETERS}
    unread = sorted(set(others) - set(getattr(kind, "saelens_tensors", ())))
    if unread:
        raise ValueError(f"{weights_path} holds {unread} beside W_enc, b_enc, W_dec, b_dec: not a plain "
                         f"{config.get('architecture', 'standard')!r} SAE")
    params, extras = kind.from_saelens({"d_sae": t["W_enc"].shape[1], **config}, others, str(config_path))
    t.update(extras)
    fastsae_metadata = dict(ours.get("metadata") or {})
    for key, ours_key in (("hook_name", "hook"), ("model_name", "model")):  # top level before SAELens 6
        value = metadata.get(key, config.get(key, config.get("hook_point") if key == "hook_name" else None))
        if value is not None:
            fastsae_metadata.setdefault(ours_key, value)
    if not ours:
        fastsae_metadata["source"] = {"format": "saelens", "path": str(path)}
    saved = config.get("dtype")
    dtype = parse_dtype(saved, str(config_path)) if saved else file_tensors["W_enc"].dtype
    return make_record(weights_path, t, activation=kind.name, params=params,
                       decoder_norm=ours.get("decoder_norm", "project"), metadata=fastsae_metadata, dtype=dtype,
                       spec=ours.get("spec"))


def write(record: SAERecord, directory: str | os.PathLike) -> Path:
    """``record`` as a SAELens 6.x directory (see the module docstring for the conversion)."""
    spec = record.spec
    hook = record.metadata.get("hook") or ""
    if spec.is_transcoder or TRANSCODER_ARROW in hook:  # SAELens's SAE files have no W_skip, no d_out, one hook
        raise ValueError(f"a transcoder ({hook or 'd_out/skip'}) has no SAELens SAE file here (its W_skip, d_out "
                         "and output hook would be lost); save it as fastsae's own: format='fastsae'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(record)
    architecture, settings, own_tensors = spec.kind(spec.params).to_saelens(tensors)
    tensors = {name: tensors[name] for name in _PARAMETERS} | own_tensors
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                "hook_name": record.metadata.get("hook"), "model_name": record.metadata.get("model"),
                "fastsae": {"spec": spec.to_dict(), "decoder_norm": spec.decoder_norm, "metadata": record.metadata}}
    config = {"architecture": architecture, "d_in": spec.d_in, "d_sae": spec.n_latents,
              "dtype": dtype_name(record.dtype), "device": "cpu", "apply_b_dec_to_input": False,
              "normalize_activations": "none", "reshape_activations": "none", **settings, "metadata": metadata}
    save_safetensors({name: t.to(record.dtype) for name, t in tensors.items()}, directory / WEIGHTS_NAME)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
    return directory
