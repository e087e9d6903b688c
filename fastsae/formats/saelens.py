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
         ...) are refused with an error naming them.
    out: the activation's architecture and settings (BatchTopK as "jumprelu", as SAELens saves its
         own), apply_b_dec_to_input false, normalize_activations "none", W_enc, b_enc, b_dec as
         they are, W_dec[j] <- W_dec[j] / n_j for decoder_norm="forward" (unit rows; the code is
         unchanged). metadata: hook_name, model_name, and a "fastsae" entry (the spec, metadata)
         that makes the round trip restore the same function, spec and metadata (the stored W_dec
         rows of a decoder_norm="forward" SAE come back unit norm, not at their old scale, which
         matters only to an optimizer that continues training them).

Transcoders (sae_lens/saes/transcoder.py: Transcoder, SkipTranscoder, JumpReLUTranscoder,
JumpReLUSkipTranscoder, architectures "transcoder", "skip_transcoder", "jumprelu_transcoder",
"jumprelu_skip_transcoder"): encode x @ W_enc + b_enc (never x - b_dec: TranscoderConfig refuses
apply_b_dec_to_input), decode code @ W_dec + b_dec with W_dec [d_sae, d_out] and b_dec [d_out]
(cfg d_out), the skip ones add x @ W_skip.T with W_skip [d_out, d_in]; the input hook is
metadata.hook_name and the output hook metadata.hook_name_out.

    in:  as an SAE of the architecture's activation ("transcoder": ReLU, "jumprelu_transcoder":
         JumpReLU with its threshold), d_out from W_dec, W_skip <- W_skip.T, metadata hook
         "hook_name->hook_name_out" (fastsae.spec.hook_in_out).
    out: a record whose spec is a transcoder's (d_out != d_in, a skip path) or whose hook is
         "IN->OUT" is written as the transcoder architecture of its activation's SAELens
         architecture ("standard" -> "transcoder" / "skip_transcoder", "jumprelu" (JumpReLU,
         BatchTopK, Matryoshka BatchTopK) -> "jumprelu_transcoder" / "jumprelu_skip_transcoder"),
         d_out, W_skip.T, hook_name IN and hook_name_out OUT; SAELens has no TopK transcoder, so a
         TopK one is refused by name (fastsae or sparsify store it).

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
from fastsae.formats.record import SAERecord, export_tensors, is_transcoder, make_record, record_hooks, require
from fastsae.spec import transcoder_hook

# metadata.sae_lens_version of the SAELens files written here: the 6.x format they follow (SAELens
# treats a file without it as pre-6.0 and renames its keys).
SAELENS_FORMAT_VERSION = "6.54.0"
_PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
# SAELens's transcoder architectures (sae_lens/saes/transcoder.py, registered in sae_lens/__init__.py):
# {architecture: (the SAE architecture whose activation it has, whether it has W_skip)}
TRANSCODER_ARCHITECTURES = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
                            "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
_TRANSCODER_OF = {(sae, skip): name for name, (sae, skip) in TRANSCODER_ARCHITECTURES.items()}


def detect(path: Path, config: dict) -> bool:
    return (path / WEIGHTS_NAME).is_file()


def read_hook(path: Path) -> str | None:
    return _hook(read_json_object(path / CONFIG_NAME))


def _hook(config: dict) -> str | None:
    """The hook a SAELens config names; "IN->OUT" for a transcoder with hook_name_out."""
    metadata = config.get("metadata") or {}
    # SAELens 6 keeps it in metadata; earlier files at the top level, before 3.0 as hook_point
    hook = metadata.get("hook_name") or config.get("hook_name") or config.get("hook_point")
    hook_out = metadata.get("hook_name_out") or config.get("hook_name_out")
    return transcoder_hook(hook, hook_out) if hook else None


def _activation_for(config: dict, ours: dict, config_path: Path, architecture: str):
    if isinstance(ours.get("spec"), dict):  # written by fastsae: its own spec names the activation
        return get_activation(ours["spec"].get("activation"))
    readers = [kind for kind in ACTIVATIONS.values() if kind.reads_saelens(config)]
    legacy_fn = config.get("activation_fn_str", config.get("activation_fn"))
    if not readers and legacy_fn not in (None, "relu", "topk"):  # SAELens 5.x: "standard" + activation_fn
        raise ValueError(f"{config_path}: activation_fn {legacy_fn!r} is not supported; fastsae loads its ReLU "
                         "and TopK SAEs")
    if len(readers) != 1:
        known = sorted({a for kind in ACTIVATIONS.values() for a in kind.saelens_architectures} |
                       set(TRANSCODER_ARCHITECTURES))
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
    architecture = config.get("architecture", "standard")
    transcoder = architecture in TRANSCODER_ARCHITECTURES
    skip = transcoder and TRANSCODER_ARCHITECTURES[architecture][1]
    if transcoder:  # the activation is the SAE architecture's; SAELens refuses b_dec on a transcoder's input
        if config.get("apply_b_dec_to_input", False):
            raise ValueError(f"{config_path}: apply_b_dec_to_input=true on a SAELens transcoder ({architecture!r}), "
                             "which SAELens itself refuses (b_dec has the output's width)")
        config = {**config, "architecture": TRANSCODER_ARCHITECTURES[architecture][0], "apply_b_dec_to_input": False}
    kind = _activation_for(config, ours, config_path, architecture)
    file_tensors = load_safetensors(weights_path)
    require(file_tensors, _PARAMETERS + (("W_skip",) if skip else ()), weights_path)
    t = {name: file_tensors[name].to(torch.float64) for name in _PARAMETERS}
    if t["W_enc"].ndim != 2 or t["W_dec"].ndim != 2:
        raise ValueError(f"{weights_path}: W_enc and W_dec must be matrices, got shapes "
                         f"{tuple(t['W_enc'].shape)} and {tuple(t['W_dec'].shape)}")
    for key, axis in (("d_in", 0), ("d_sae", 1)):
        if key in config and config[key] != t["W_enc"].shape[axis]:
            raise ValueError(f"{config_path}: {key}={config[key]} but W_enc has shape {tuple(t['W_enc'].shape)}")
    # a transcoder writes d_out (W_dec [d_sae, d_out], b_dec [d_out]); an SAE its input's width
    d_out = t["W_dec"].shape[1] if transcoder else t["W_enc"].shape[0]
    if transcoder and "d_out" in config and config["d_out"] != d_out:
        raise ValueError(f"{config_path}: d_out={config['d_out']} but W_dec has shape {tuple(t['W_dec'].shape)}")
    if t["b_dec"].shape != (d_out,):
        raise ValueError(f"{weights_path}: b_dec has shape {tuple(t['b_dec'].shape)}, expected ({d_out},)")
    if skip:  # SkipTranscoder.forward adds x @ W_skip.T: its W_skip is [d_out, d_in]
        W_skip = file_tensors["W_skip"].to(torch.float64)
        expected = (d_out, t["W_enc"].shape[0])
        if tuple(W_skip.shape) != expected:
            raise ValueError(f"{weights_path}: W_skip has shape {tuple(W_skip.shape)}, expected {expected} "
                             "([d_out, d_in], SAELens's layout)")
        t["W_skip"] = W_skip.t()
    if config.get("apply_b_dec_to_input", True):  # its encoder reads x - b_dec
        t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]
    if config.get("rescale_acts_by_decoder_norm", False) and not transcoder:  # no transcoder field
        # it codes act(n_j * pre_j) and decodes with W_dec[j] / n_j (all-zero rows stay zero)
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-12)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    known = _PARAMETERS + (("W_skip",) if skip else ())
    others = {name: tensor.to(torch.float64) for name, tensor in file_tensors.items() if name not in known}
    unread = sorted(set(others) - set(getattr(kind, "saelens_tensors", ())))
    if unread:
        raise ValueError(f"{weights_path} holds {unread} beside {', '.join(known)}: not a plain {architecture!r} "
                         f"{'transcoder' if transcoder else 'SAE'}")
    params, extras = kind.from_saelens({"d_sae": t["W_enc"].shape[1], **config}, others, str(config_path))
    t.update(extras)
    fastsae_metadata = dict(ours.get("metadata") or {})
    hook, model = _hook(config), metadata.get("model_name", config.get("model_name"))  # top level before SAELens 6
    for key, value in (("hook", hook), ("model", model)):
        if value is not None:
            fastsae_metadata.setdefault(key, value)
    if not ours:
        fastsae_metadata["source"] = {"format": "saelens", "path": str(path)}
    saved = config.get("dtype")
    dtype = parse_dtype(saved, str(config_path)) if saved else file_tensors["W_enc"].dtype
    return make_record(weights_path, t, activation=kind.name, params=params,
                       decoder_norm=ours.get("decoder_norm", "project"), metadata=fastsae_metadata, dtype=dtype,
                       spec=ours.get("spec"), d_out=d_out, skip=skip)


def write(record: SAERecord, directory: str | os.PathLike) -> Path:
    """``record`` as a SAELens 6.x directory (see the module docstring for the conversion)."""
    spec = record.spec
    tensors = export_tensors(record)
    architecture, settings, own_tensors = spec.kind(spec.params).to_saelens(tensors)
    hook_in, hook_out = record_hooks(record)
    transcoder = is_transcoder(record)
    if transcoder:
        architecture = _TRANSCODER_OF.get((architecture, spec.skip))
        if architecture is None:
            raise ValueError(
                f"SAELens has no {spec.activation!r} transcoder: its transcoders are ReLU ('transcoder', "
                f"'skip_transcoder') and JumpReLU ('jumprelu_transcoder', 'jumprelu_skip_transcoder'; fastsae's "
                f"BatchTopK and Matryoshka BatchTopK are written as these, by their inference threshold). Save this "
                f"transcoder with format='fastsae' (or format='sparsify', which stores TopK transcoders)")
        settings = {}  # SAELens's transcoder configs have no activation settings (it drops unknown keys)
        if spec.skip:  # SkipTranscoder.forward adds x @ W_skip.T: SAELens's W_skip is [d_out, d_in]
            own_tensors = {**own_tensors, "W_skip": tensors["W_skip"].t().contiguous()}
    tensors = {name: tensors[name] for name in _PARAMETERS} | own_tensors
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "hook_name": hook_in}
    if transcoder:
        metadata["hook_name_out"] = hook_out  # where SAELens's HookedSAETransformer puts the output
    metadata |= {"model_name": record.metadata.get("model"),
                 "fastsae": {"spec": spec.to_dict(), "decoder_norm": spec.decoder_norm, "metadata": record.metadata}}
    config = {"architecture": architecture, "d_in": spec.d_in, "d_sae": spec.n_latents,
              **({"d_out": spec.d_out} if transcoder else {}),
              "dtype": dtype_name(record.dtype), "device": "cpu", "apply_b_dec_to_input": False,
              "normalize_activations": "none", "reshape_activations": "none", **settings, "metadata": metadata}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors({name: t.to(record.dtype) for name, t in tensors.items()}, directory / WEIGHTS_NAME)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
    return directory
