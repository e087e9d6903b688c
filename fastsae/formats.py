"""SAE files in and out: fastsae's own, SAELens, sparsify and the paper's e2e_sae checkpoints.

``E2ESAE.from_pretrained(path, hook=None)`` reads every format below, detected from the files;
``E2ESAE.save_pretrained(path, format=...)`` writes fastsae, SAELens and sparsify directories;
``fastsae export RUN_DIR --format ...`` converts the latest SAEs of a run.

fastsae's function, with n_j = ||W_dec[j]||:
    pre = x @ W_enc + b_enc;  code = relu(pre) (ReLU) or the k largest relu(pre_j) (TopK)
    x_hat = sum_j code_j * W_dec[j] / n_j + b_dec   (decoder_norm="forward")
    x_hat = sum_j code_j * W_dec[j] + b_dec         (decoder_norm="project": rows unit norm)

Each conversion below gives the same reconstruction (to float rounding) and the same code values
and TopK selection; all folds are computed in float64 and then cast.

SAELens 6.x (cfg.json + sae_weights.safetensors; architectures "standard" = ReLU, "topk"; also 5.x
configs, whose TopK SAEs are "standard" with activation_fn_str "topk" and hook_name at top level):
    it encodes x - b_dec * apply_b_dec_to_input, and decodes code @ W_dec + b_dec.
    in:  W_enc, W_dec, b_dec as stored;  b_enc <- b_enc - b_dec @ W_enc when apply_b_dec_to_input.
         topk with rescale_acts_by_decoder_norm (its code is relu(n_j * pre_j), decoded with
         W_dec[j] / n_j): W_enc[:, j] <- n_j W_enc[:, j], b_enc[j] <- n_j b_enc[j], W_dec[j] <- W_dec[j] / n_j.
         Loaded with decoder_norm="project" (the forward uses W_dec as stored, as SAELens does).
         normalize_activations other than "none", hook_z reshaping and other architectures
         (jumprelu, gated, batchtopk, transcoders, ...) are refused with an error naming them.
    out: architecture "standard" / "topk" (k; rescale_acts_by_decoder_norm false),
         apply_b_dec_to_input false, normalize_activations "none", W_enc, b_enc, b_dec as they are,
         W_dec[j] <- W_dec[j] / n_j for decoder_norm="forward" (unit rows; the code is unchanged).
         metadata: hook_name, model_name, and a "fastsae" entry (decoder_norm, metadata) that
         makes the round trip restore the same function, decoder_norm and metadata (the stored
         W_dec rows of a decoder_norm="forward" SAE come back unit norm, not at their old scale,
         which matters only to an optimizer that continues training them).
sparsify 1.x (cfg.json + sae.safetensors; TopK only; a run holds one such directory per hookpoint):
    it encodes (x - b_dec) @ encoder.weight.T + encoder.bias, then relu and the top k.
    in:  W_enc = encoder.weight.T, b_enc = encoder.bias - b_dec @ W_enc, W_dec and b_dec as stored
         (decoder_norm="project"); skip connections, transcoders and groupmax are refused.
    out: encoder.weight = W_enc.T, encoder.bias = b_enc + b_dec @ W_enc, W_dec rows as in SAELens;
         the "fastsae" entry goes into the safetensors header (which sparsify does not read).
    Hookpoints are Hugging Face module outputs: sparsify's `layers.L` (`h.L` on GPT-2) is the
    residual after block L, fastsae's blocks.(L+1).hook_resid_pre (= blocks.L.hook_resid_post).
e2e_sae, the paper's code (read only): torch.save of SAETransformer.saes.state_dict() as
    samples_<N>.pt, with final_config.yaml beside it (tlens_model_name, saes.sae_positions). Keys
    per SAE, its hook with "." written "-": `<hook>.encoder.0.weight` [n, d], `.encoder.0.bias` [n],
    `.decoder.weight` [d, n] (normalised per column in its forward), `.decoder.bias` [d].
    in:  W_enc = encoder.0.weight.T, b_enc = encoder.0.bias, W_dec = decoder.weight.T (as stored),
         b_dec = decoder.bias; ReLU with decoder_norm="forward" (exactly its forward pass).

fastsae's own cfg.json carries `architecture`, `apply_b_dec_to_input` and `normalize_activations`
for SAELens's sake: `architecture` names no SAELens architecture, so SAELens refuses the directory
(even with n_latents renamed d_sae) with a message that says how to convert it, rather than
loading it as a ReLU SAE that subtracts b_dec and ignores the forward-pass normalisation.
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from pathlib import Path

import torch

from fastsae._files import atomic_write, atomic_write_text, read_json_object
from fastsae.sae import CONFIG_NAME, SAELENS_REFUSAL, WEIGHTS_NAME, E2ESAE, load_safetensors

FORMATS = ("fastsae", "saelens", "sparsify")
SPARSIFY_WEIGHTS_NAME = "sae.safetensors"
E2E_SAE_CONFIG_NAME = "final_config.yaml"
SAELENS_ARCHITECTURES = {"standard": "relu", "topk": "topk"}
# metadata.sae_lens_version of the SAELens files written here: the 6.x format they follow (SAELens
# treats a file without it as pre-6.0 and renames its keys).
SAELENS_FORMAT_VERSION = "6.54.0"

# The run directory layout the trainer writes (fastsae.train.checkpoint writes it and imports
# these): the reading side lives here so from_pretrained can open runs without the trainer.
RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
SAE_DIR = "saes"

_SPARSIFY_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)$")
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
_E2E_KEYS = ("encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias")
_E2E_SAMPLES = re.compile(r"^samples_(\d+)\.pt$")


# --------------------------------------------------------------------------------------------
# run directories

def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run: the one `latest` names, else the newest step_*
    directory holding a trainer state (in case `latest` itself was lost), else None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


# --------------------------------------------------------------------------------------------
# hook names

def hook_from_sparsify(hookpoint: str) -> str | None:
    """fastsae's name for a sparsify hookpoint: `layers.L` / `h.L` -> blocks.(L+1).hook_resid_pre;
    None for hookpoints with no residual-stream equivalent known here (mlp, attention outputs)."""
    match = _SPARSIFY_LAYER.match(hookpoint)
    return f"blocks.{int(match.group(1)) + 1}.hook_resid_pre" if match else None


def sparsify_hookpoint(hook: str, layers_name: str = "layers") -> str:
    """sparsify's hookpoint for a fastsae residual hook: blocks.L.hook_resid_pre -> `layers.(L-1)`,
    blocks.L.hook_resid_post -> `layers.L` (layers_name "h" for GPT-2, whose blocks are `h.L`)."""
    match = _RESID_HOOK.match(hook)
    if match is None:
        raise ValueError(f"hook {hook!r} has no sparsify hookpoint here: sparsify reads module outputs, and "
                         "only blocks.L.hook_resid_pre (L >= 1) and blocks.L.hook_resid_post map to them")
    layer = int(match.group(1)) - (match.group(2) == "pre")
    if layer < 0:
        raise ValueError(f"hook {hook!r} is the embedding output, which is no sparsify layer output; "
                         "sparsify hookpoints start at blocks.1.hook_resid_pre (= layers.0)")
    return f"{layers_name}.{layer}"


def _hook_aliases(hook: str) -> set[str]:
    """Names that mean the same residual stream as ``hook`` (for matching a requested hook)."""
    aliases = {hook}
    match = _RESID_HOOK.match(hook)
    if match:
        layer = int(match.group(1))
        if match.group(2) == "pre" and layer >= 1:
            aliases.add(f"blocks.{layer - 1}.hook_resid_post")
        elif match.group(2) == "post":
            aliases.add(f"blocks.{layer + 1}.hook_resid_pre")
    return aliases


# --------------------------------------------------------------------------------------------
# detection: a path -> the SAEs in it, by hook name, each loaded only when asked for

class _Entry:
    """One SAE in a file or directory: its hook (None if the file does not say) and its loader."""

    def __init__(self, hook: str | None, names: set[str], load):
        self.hook, self.names, self.load = hook, names, load


def detect_format(path: str | os.PathLike) -> str:
    """The format of an SAE file or directory: "fastsae", "saelens", "sparsify", "e2e_sae",
    "fastsae-run" (a run directory), "fastsae-checkpoint" (checkpoints/step_N) or "collection"
    (a directory of SAE directories, as `fastsae export` and sparsify runs write)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".pt":
            return "e2e_sae"
        raise ValueError(f"{path} is a file but not an e2e_sae checkpoint (.pt); SAE formats are directories "
                         f"(fastsae, SAELens, sparsify) or e2e_sae .pt files")
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE directory or file at {path}")
    if (path / CONFIG_NAME).is_file():
        # cfg.json decides first: a directory saved again in another format may keep the old
        # format's weights file beside the new one
        config = read_json_object(path / CONFIG_NAME)
        if config.get("format") == "fastsae.E2ESAE" or "n_latents" in config:
            return "fastsae"
        if (path / SPARSIFY_WEIGHTS_NAME).is_file():
            return "sparsify"
        if (path / WEIGHTS_NAME).is_file():
            return "saelens"
        raise FileNotFoundError(f"{path} has {CONFIG_NAME} but neither {WEIGHTS_NAME} (SAELens) "
                                f"nor {SPARSIFY_WEIGHTS_NAME} (sparsify)")
    if (path / CHECKPOINTS).is_dir() or (path / RUN_CONFIG).is_file():
        return "fastsae-run"
    if (path / SAE_DIR).is_dir():
        return "fastsae-checkpoint"
    if any(_E2E_SAMPLES.match(p.name) for p in path.iterdir()):
        return "e2e_sae"
    if any((sub / CONFIG_NAME).is_file() for sub in path.iterdir() if sub.is_dir()):
        return "collection"
    raise FileNotFoundError(
        f"{path} has no {CONFIG_NAME} and holds no SAE: expected {CONFIG_NAME} with {WEIGHTS_NAME} (fastsae, "
        f"SAELens) or {SPARSIFY_WEIGHTS_NAME} (sparsify), a run directory ({CHECKPOINTS}/), a checkpoint "
        f"({SAE_DIR}/), e2e_sae samples_<N>.pt files, or subdirectories holding SAEs")


def _entries(path: Path, device, dtype) -> list[_Entry]:
    kind = detect_format(path)
    if kind in ("fastsae", "saelens", "sparsify"):
        return [_single_entry(path, kind, device, dtype)]
    if kind == "e2e_sae":
        return _e2e_sae_entries(path, device, dtype)
    if kind == "fastsae-run":
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint under {CHECKPOINTS}/")
        path = checkpoint
    if kind in ("fastsae-run", "fastsae-checkpoint"):
        path = path / SAE_DIR
    entries = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
        entry = _single_entry(sub, detect_format(sub), device, dtype)
        if entry.hook is None:  # sparsify's directory name is its hookpoint; ours the hook name
            entry.hook = hook_from_sparsify(sub.name) or sub.name
        entry.names |= _hook_aliases(entry.hook) | {sub.name}
        entries.append(entry)
    return entries


def _single_entry(path: Path, kind: str, device, dtype) -> _Entry:
    if kind == "fastsae":
        hook = (read_json_object(path / CONFIG_NAME).get("metadata") or {}).get("hook")
        load = partial(E2ESAE._load_fastsae, path, device=device, dtype=dtype)
    elif kind == "saelens":
        hook = (read_json_object(path / CONFIG_NAME).get("metadata") or {}).get("hook_name")
        load = partial(_load_saelens, path, device, dtype)
    else:
        hook = hook_from_sparsify(path.name)
        load = partial(_load_sparsify, path, device, dtype)
    names = _hook_aliases(hook) if hook else set()
    return _Entry(hook, names, load)


def _select(path: Path, entries: list[_Entry], hook: str | None) -> _Entry:
    if not entries:
        raise FileNotFoundError(f"{path} holds no SAE")
    hooks = [entry.hook for entry in entries]
    if hook is None:
        if len(entries) > 1:
            raise ValueError(f"{path} holds {len(entries)} SAEs; choose one with hook=, one of {hooks}")
        return entries[0]
    matches = [entry for entry in entries if hook in entry.names]
    if not matches and len(entries) == 1 and entries[0].hook is None:
        return entries[0]  # the file does not name its hook: take the caller's word for it
    if not matches:
        raise ValueError(f"{path} has no SAE for hook {hook!r}; it holds SAEs for {hooks}")
    return matches[0]


def load(path: str | os.PathLike, hook: str | None = None, *, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> E2ESAE:
    """The SAE at ``path`` (any format above); ``hook`` picks one where the path holds several."""
    path = Path(path)
    entry = _select(path, _entries(path, device, dtype), hook)
    sae = entry.load()
    name = hook if hook is not None else entry.hook
    if name is not None and "hook" not in sae.metadata:
        sae.metadata["hook"] = name
    return sae


def load_all(path: str | os.PathLike, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> dict[str, E2ESAE]:
    """Every SAE at ``path``, by hook name (a run: the SAEs of its latest checkpoint)."""
    path = Path(path)
    saes = {}
    for entry in _entries(path, device, dtype):
        if entry.hook is None:
            raise ValueError(f"{path} does not say which hook its SAE reads; load it with "
                             "E2ESAE.from_pretrained(path, hook=...)")
        saes[entry.hook] = sae = entry.load()
        sae.metadata.setdefault("hook", entry.hook)
    return saes


# --------------------------------------------------------------------------------------------
# building an E2ESAE from converted tensors

def _dtype_from_name(name, where: str) -> torch.dtype:
    value = getattr(torch, str(name).removeprefix("torch."), None)  # "float32" or "torch.float32"
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return value


def _build(where, *, activation: str, k: int | None, decoder_norm: str, metadata: dict, tensors: dict,
           saved_dtype: torch.dtype, device, dtype) -> E2ESAE:
    """An E2ESAE holding ``tensors`` (W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d], any float dtype)."""
    d_in, n_latents = tensors["W_enc"].shape
    expected = {"W_enc": (d_in, n_latents), "b_enc": (n_latents,), "W_dec": (n_latents, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                             f"(d_in={d_in}, n_latents={n_latents} from W_enc)")
    target_dtype = dtype or saved_dtype
    try:
        sae = E2ESAE(d_in, n_latents, activation, k, decoder_norm=decoder_norm, metadata=metadata,
                     dtype=target_dtype, device="meta")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    sae = sae.to_empty(device=device or "cpu")
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(tensors[name].to(device=sae.device, dtype=target_dtype))
    return sae


def _unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    return W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def _export_tensors(sae: E2ESAE) -> dict[str, torch.Tensor]:
    """The SAE's parameters in float64 on the CPU, W_dec with the rows its forward pass uses."""
    tensors = {name: getattr(sae, name).detach().to("cpu", torch.float64) for name in _PARAMETERS}
    if sae.decoder_norm == "forward":
        tensors["W_dec"] = _unit_rows(tensors["W_dec"])
    return tensors


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype,
                      metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2)
    atomic_write_text(path, text)


def _require(tensors: dict, names, where: Path) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{where} lacks the tensors {missing}; it holds {sorted(tensors)}")


# --------------------------------------------------------------------------------------------
# SAELens

def _load_saelens(path: Path, device, dtype) -> E2ESAE:
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    config = read_json_object(config_path)
    architecture = config.get("architecture", "standard")
    if architecture == SAELENS_REFUSAL:
        raise ValueError(f"{config_path} is a fastsae config edited to look like SAELens's; restore its "
                         "n_latents key, or convert the SAE with save_pretrained(format='saelens')")
    if architecture not in SAELENS_ARCHITECTURES:
        raise ValueError(f"{config_path}: SAELens architecture {architecture!r} is not supported; fastsae loads "
                         f"{sorted(SAELENS_ARCHITECTURES)} (ReLU and TopK SAEs)")
    norm = config.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise ValueError(f"{config_path}: normalize_activations={norm!r} rescales the SAE's input at run time, which "
                         "fastsae does not do; only 'none' loads (fold the normalisation into the weights first)")
    if config.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{config_path}: reshape_activations={config['reshape_activations']!r} (hook_z SAEs read "
                         "per-head activations); fastsae SAEs read [..., d_in] activations only")
    metadata = config.get("metadata") or {}
    tensors = load_safetensors(weights_path)
    _require(tensors, _PARAMETERS, weights_path)
    extra = sorted(set(tensors) - set(_PARAMETERS))
    if extra:
        raise ValueError(f"{weights_path} holds {extra} beside W_enc, b_enc, W_dec, b_dec: not a plain "
                         f"{architecture!r} SAE")
    saved_dtype = tensors["W_enc"].dtype
    t = {name: tensors[name].to(torch.float64) for name in _PARAMETERS}
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
    activation = SAELENS_ARCHITECTURES[architecture]
    k = config.get("k") if activation == "topk" else None
    # SAELens before 6.0 wrote TopK SAEs as architecture "standard" with activation_fn_str "topk"
    # (activation_fn in some 5.x versions) and k in activation_fn_kwargs
    legacy_fn = config.get("activation_fn_str", config.get("activation_fn"))
    if architecture == "standard" and legacy_fn not in (None, "relu"):
        if legacy_fn != "topk":
            raise ValueError(f"{config_path}: activation_fn {legacy_fn!r} is not supported; fastsae loads ReLU and "
                             "TopK SAEs")
        activation, k = "topk", (config.get("activation_fn_kwargs") or {}).get("k")
    if activation == "topk" and not isinstance(k, int):
        raise ValueError(f"{config_path}: a TopK SAE needs an integer k, got {k!r}")
    if activation == "topk" and config.get("rescale_acts_by_decoder_norm", False):
        # it selects and codes by n_j * pre_j and decodes with W_dec[j] / n_j (all-zero rows stay zero)
        norms = t["W_dec"].norm(dim=1).clamp_min(1e-12)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    ours = metadata.get("fastsae") if isinstance(metadata.get("fastsae"), dict) else {}
    fastsae_metadata = dict(ours.get("metadata") or {})
    for key, ours_key in (("hook_name", "hook"), ("model_name", "model")):  # top level before SAELens 6
        value = metadata.get(key, config.get(key))
        if value is not None:
            fastsae_metadata.setdefault(ours_key, value)
    if not ours:
        fastsae_metadata["source"] = {"format": "saelens", "path": str(path)}
    saved = config.get("dtype")
    return _build(weights_path, activation=activation, k=k, decoder_norm=ours.get("decoder_norm", "project"),
                  metadata=fastsae_metadata, tensors=t,
                  saved_dtype=_dtype_from_name(saved, str(config_path)) if saved else saved_dtype,
                  device=device, dtype=dtype)


def save_saelens(sae: E2ESAE, directory: str | os.PathLike) -> Path:
    """Write ``sae`` as a SAELens 6.x directory (see the module docstring for the conversion)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _export_tensors(sae)
    architecture = {"relu": "standard", "topk": "topk"}[sae.activation]
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                "hook_name": sae.metadata.get("hook"), "model_name": sae.metadata.get("model"),
                "fastsae": {"decoder_norm": sae.decoder_norm, "metadata": sae.metadata}}
    config = {"architecture": architecture, "d_in": sae.d_in, "d_sae": sae.n_latents,
              "dtype": str(sae.dtype).removeprefix("torch."), "device": "cpu",
              "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
              "metadata": metadata}
    if sae.activation == "topk":
        config.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    _save_safetensors(tensors, directory / WEIGHTS_NAME, sae.dtype)
    _write_json(directory / CONFIG_NAME, config)
    return directory


# --------------------------------------------------------------------------------------------
# sparsify

def _load_sparsify(path: Path, device, dtype) -> E2ESAE:
    config_path, weights_path = path / CONFIG_NAME, path / SPARSIFY_WEIGHTS_NAME
    config = read_json_object(config_path)
    for key, why in (("skip_connection", "a linear skip connection"), ("transcode", "a transcoder")):
        if config.get(key):
            raise ValueError(f"{config_path}: {key}=true ({why}) is not an SAE fastsae can load")
    if config.get("activation", "topk") != "topk":
        raise ValueError(f"{config_path}: activation={config['activation']!r}; fastsae loads sparsify's TopK SAEs only")
    tensors = load_safetensors(weights_path)
    _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), weights_path)
    saved_dtype = tensors["encoder.weight"].dtype
    encoder = tensors["encoder.weight"].to(torch.float64)
    if encoder.ndim != 2:
        raise ValueError(f"{weights_path}: encoder.weight must be [num_latents, d_in], got {tuple(encoder.shape)}")
    if "d_in" in config and config["d_in"] != encoder.shape[1]:
        raise ValueError(f"{config_path}: d_in={config['d_in']} but encoder.weight has shape {tuple(encoder.shape)}")
    t = {"W_enc": encoder.t(), "W_dec": tensors["W_dec"].to(torch.float64),
         "b_dec": tensors["b_dec"].to(torch.float64)}
    if t["b_dec"].shape != (encoder.shape[1],):
        raise ValueError(f"{weights_path}: b_dec has shape {tuple(t['b_dec'].shape)}, expected ({encoder.shape[1]},)")
    t["b_enc"] = tensors["encoder.bias"].to(torch.float64) - t["b_dec"] @ t["W_enc"]  # it encodes x - b_dec
    if "k" not in config:
        raise ValueError(f"{config_path} lacks the key 'k' (active latents per token)")
    ours = json.loads(_safetensors_metadata(weights_path).get("fastsae", "{}"))
    metadata = dict(ours.get("metadata") or {"source": {"format": "sparsify", "path": str(path)}})
    return _build(weights_path, activation="topk", k=config["k"], decoder_norm=ours.get("decoder_norm", "project"),
                  metadata=metadata, tensors=t, saved_dtype=saved_dtype, device=device, dtype=dtype)


def save_sparsify(sae: E2ESAE, directory: str | os.PathLike) -> Path:
    """Write a TopK ``sae`` as a sparsify directory (cfg.json + sae.safetensors)."""
    if sae.activation != "topk":
        raise ValueError(f"sparsify stores TopK SAEs only; this SAE has activation={sae.activation!r} "
                         "(use format='saelens' for ReLU SAEs)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t = _export_tensors(sae)
    tensors = {"encoder.weight": t["W_enc"].t(), "encoder.bias": t["b_enc"] + t["b_dec"] @ t["W_enc"],
               "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    expansion = sae.n_latents // sae.d_in if sae.n_latents % sae.d_in == 0 else 0
    config = {"activation": "topk", "expansion_factor": expansion, "normalize_decoder": True,
              "num_latents": sae.n_latents, "k": sae.k, "multi_topk": False, "skip_connection": False,
              "transcode": False, "d_in": sae.d_in}
    # sparsify reads no metadata of ours; the safetensors header carries it (sparsify ignores it,
    # and would print a note for an unknown cfg.json key) so the round trip restores the SAE
    ours = {"fastsae": json.dumps({"decoder_norm": sae.decoder_norm, "metadata": sae.metadata})}
    _save_safetensors(tensors, directory / SPARSIFY_WEIGHTS_NAME, sae.dtype, metadata=ours)
    _write_json(directory / CONFIG_NAME, config)
    return directory


# --------------------------------------------------------------------------------------------
# e2e_sae (the paper's code)

def _e2e_sae_entries(path: Path, device, dtype) -> list[_Entry]:
    if path.is_dir():
        samples = {int(m.group(1)): p for p in path.iterdir() if (m := _E2E_SAMPLES.match(p.name))}
        checkpoint = samples[max(samples)]  # the latest, as e2e_sae's SAETransformer.from_checkpoint
    else:
        checkpoint = path
    config_path = checkpoint.parent / E2E_SAE_CONFIG_NAME
    config = {}
    if config_path.is_file():
        import yaml

        config = yaml.safe_load(config_path.read_text()) or {}
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"{checkpoint} is not a readable torch state dict ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint} does not hold a state dict of tensors "
                         "(e2e_sae saves SAETransformer.saes.state_dict())")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        suffix = next((s for s in _E2E_KEYS if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"{checkpoint}: unexpected key {key!r}; an e2e_sae SAE checkpoint holds "
                             f"<hook>.{{{', '.join(_E2E_KEYS)}}} (other sparsifiers such as the codebook are not SAEs)")
        groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
    model = config.get("tlens_model_name") or config.get("tlens_model_path")
    entries = []
    for prefix, group in sorted(groups.items()):
        hook = prefix.replace("-", ".")  # its ModuleDict keys write the hook's "." as "-"
        load = partial(_load_e2e_sae, checkpoint, group, hook, model, device, dtype)
        entries.append(_Entry(hook, _hook_aliases(hook) | {prefix}, load))
    return entries


def _load_e2e_sae(checkpoint: Path, group: dict, hook: str, model, device, dtype) -> E2ESAE:
    where = f"{checkpoint} ({hook})"
    missing = [key for key in _E2E_KEYS if key not in group]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    encoder, decoder = group["encoder.0.weight"], group["decoder.weight"]
    if encoder.ndim != 2 or decoder.shape != encoder.shape[::-1]:
        raise ValueError(f"{where}: encoder.0.weight {tuple(encoder.shape)} and decoder.weight "
                         f"{tuple(decoder.shape)} must be [n, d] and [d, n]")
    tensors = {"W_enc": encoder.t(), "b_enc": group["encoder.0.bias"], "W_dec": decoder.t(),
               "b_dec": group["decoder.bias"]}
    metadata = {"hook": hook, "source": {"format": "e2e_sae", "path": str(checkpoint)}}
    if model is not None:
        metadata["model"] = str(model)
    return _build(where, activation="relu", k=None, decoder_norm="forward", metadata=metadata, tensors=tensors,
                  saved_dtype=encoder.dtype, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# writing

def save(sae: E2ESAE, directory: str | os.PathLike, format: str) -> Path:
    """Write ``sae`` to ``directory`` in ``format`` ("saelens" or "sparsify"; "fastsae" is
    E2ESAE.save_pretrained's own)."""
    writers = {"saelens": save_saelens, "sparsify": save_sparsify}
    if format == "fastsae":
        return sae.save_pretrained(directory)
    if format not in writers:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return writers[format](sae, directory)


def export(path: str | os.PathLike, format: str, out: str | os.PathLike, *, layers_name: str = "layers",
           saes: dict[str, E2ESAE] | None = None) -> dict[str, Path]:
    """Write every SAE at ``path`` (a run: its latest checkpoint) to ``out``, one subdirectory per
    hook: named by the hook for fastsae / SAELens, by the hookpoint for sparsify (so that
    sparsify's SparseCoder.load_many(out, local=True) reads it). Returns {hook: directory}."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    saes = load_all(path) if saes is None else saes
    names = {hook: sparsify_hookpoint(hook, layers_name) if format == "sparsify" else hook for hook in saes}
    out = Path(out)
    return {hook: save(sae, out / names[hook], format) for hook, sae in saes.items()}
