"""sparsify 1.x sparse coder directories (cfg.json + sae.safetensors; TopK only), both ways.

sparsify (sparsify/sparse_coder.py, SparseCoder.encode / decode / forward) encodes
(x - b_dec) @ encoder.weight.T + encoder.bias, then relu and the top k, and decodes with W_dec
[num_latents, d_in] and b_dec [d_in]. A transcoder (cfg transcode=true) encodes x itself, not
x - b_dec; skip_connection=true adds x @ W_skip.T, W_skip [d_in, d_in] (an SAE's or a
transcoder's). sparsify has no d_out: its coders write the width they read.

    in:  W_enc = encoder.weight.T, b_enc = encoder.bias - b_dec @ W_enc (transcode: encoder.bias),
         W_dec and b_dec as stored (decoder_norm="project"), W_skip = W_skip.T; other activations
         are refused. The hook is the hookpoint's (fastsae.formats.hooks: a transcoder at
         `layers.L.mlp` is blocks.L.mlp.hook_in->blocks.L.hook_mlp_out).
    out: encoder.weight = W_enc.T, encoder.bias = b_enc + b_dec @ W_enc (a transcoder, whose hooks
         differ: transcode=true and encoder.bias = b_enc), W_dec rows as the forward pass uses
         them, skip_connection and W_skip = W_skip.T for a skip path; the activation must be one
         sparsify stores (its registry module's sparsify_refusal says why not otherwise), d_out
         must equal d_in, and a transcoder's hooks must be a sparsify hookpoint's. fastsae's spec
         and metadata go into the safetensors header (which sparsify does not read), so the
         round trip restores them.

A sparsify run holds one such directory per hookpoint, named by it (see fastsae.formats.hooks).
All folds are computed in float64 and then cast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastsae._files import atomic_write_text, load_safetensors, read_json_object, save_safetensors
from fastsae.formats.hooks import hook_from_sparsify, sparsify_hookpoint
from fastsae.formats.native import CONFIG_NAME
from fastsae.formats.record import SAERecord, export_tensors, make_record, record_hooks, require

WEIGHTS_NAME = "sae.safetensors"


def detect(path: Path, config: dict) -> bool:
    return (path / WEIGHTS_NAME).is_file()


def read_hook(path: Path) -> str | None:
    return hook_from_sparsify(path.name, transcode=bool(read_json_object(path / CONFIG_NAME).get("transcode")))


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def read(path: Path) -> SAERecord:
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    config = read_json_object(config_path)
    transcode, skip = bool(config.get("transcode")), bool(config.get("skip_connection"))
    if config.get("activation", "topk") != "topk":
        raise ValueError(f"{config_path}: activation={config['activation']!r}; fastsae loads sparsify's TopK SAEs only")
    tensors = load_safetensors(weights_path)
    require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), weights_path)
    encoder = tensors["encoder.weight"].to(torch.float64)
    if encoder.ndim != 2:
        raise ValueError(f"{weights_path}: encoder.weight must be [num_latents, d_in], got {tuple(encoder.shape)}")
    if "d_in" in config and config["d_in"] != encoder.shape[1]:
        raise ValueError(f"{config_path}: d_in={config['d_in']} but encoder.weight has shape {tuple(encoder.shape)}")
    t = {"W_enc": encoder.t(), "W_dec": tensors["W_dec"].to(torch.float64), "b_dec": tensors["b_dec"].to(torch.float64)}
    if t["b_dec"].shape != (encoder.shape[1],):
        raise ValueError(f"{weights_path}: b_dec has shape {tuple(t['b_dec'].shape)}, expected ({encoder.shape[1]},)")
    t["b_enc"] = tensors["encoder.bias"].to(torch.float64)
    if not transcode:  # an SAE encodes x - b_dec
        t["b_enc"] = t["b_enc"] - t["b_dec"] @ t["W_enc"]
    if skip:  # forward adds x @ W_skip.mT
        require(tensors, ("W_skip",), weights_path)
        t["W_skip"] = tensors["W_skip"].to(torch.float64).t()
    if "k" not in config:
        raise ValueError(f"{config_path} lacks the key 'k' (active latents per token)")
    ours = json.loads(_header(weights_path).get("fastsae", "{}"))
    metadata = dict(ours.get("metadata") or {"source": {"format": "sparsify", "path": str(path)}})
    return make_record(weights_path, t, activation="topk", params={"k": config["k"]},
                       decoder_norm=ours.get("decoder_norm", "project"), metadata=metadata,
                       dtype=tensors["encoder.weight"].dtype, spec=ours.get("spec"), d_out=encoder.shape[1],
                       skip=skip)


def write(record: SAERecord, directory: str | os.PathLike) -> Path:
    """``record`` as a sparsify directory (cfg.json + sae.safetensors)."""
    spec = record.spec
    refusal = spec.kind.sparsify_refusal
    if refusal:
        raise ValueError(f"{refusal}; this SAE has activation={spec.activation!r}")
    if spec.d_out != spec.d_in:
        raise ValueError(f"sparsify's coders write the width they read (W_dec [num_latents, d_in], b_dec [d_in]); "
                         f"this transcoder reads d_in={spec.d_in} and writes d_out={spec.d_out}: save it with "
                         "format='fastsae'")
    hook_in, hook_out = record_hooks(record)
    transcode = hook_in != hook_out
    if transcode:  # its hooks must be a sparsify hookpoint's input and output (refused by name otherwise)
        sparsify_hookpoint(record.metadata["hook"])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t = export_tensors(record)
    bias = t["b_enc"] if transcode else t["b_enc"] + t["b_dec"] @ t["W_enc"]  # an SAE encodes x - b_dec
    tensors = {"encoder.weight": t["W_enc"].t(), "encoder.bias": bias, "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if spec.skip:  # forward adds x @ W_skip.mT
        tensors["W_skip"] = t["W_skip"].t()
    expansion = spec.n_latents // spec.d_in if spec.n_latents % spec.d_in == 0 else 0
    config = {"activation": "topk", "expansion_factor": expansion, "normalize_decoder": True,
              "num_latents": spec.n_latents, "k": spec.k, "multi_topk": False, "skip_connection": spec.skip,
              "transcode": transcode, "d_in": spec.d_in}
    # sparsify reads no metadata of ours; the safetensors header carries it (sparsify ignores it,
    # and would print a note for an unknown cfg.json key) so the round trip restores the SAE
    ours = {"fastsae": json.dumps({"spec": spec.to_dict(), "decoder_norm": spec.decoder_norm,
                                   "metadata": record.metadata})}
    save_safetensors({name: x.to(record.dtype) for name, x in tensors.items()}, directory / WEIGHTS_NAME,
                     metadata=ours)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
    return directory
