"""The paper's e2e_sae checkpoints (read only).

e2e_sae saves SAETransformer.saes.state_dict() with torch.save as `samples_<N>.pt`, with
final_config.yaml beside it (tlens_model_name, saes.sae_positions). Keys per SAE, its hook with
"." written "-": `<hook>.encoder.0.weight` [n, d], `.encoder.0.bias` [n], `.decoder.weight` [d, n]
(normalised per column in its forward), `.decoder.bias` [d].

    in:  W_enc = encoder.0.weight.T, b_enc = encoder.0.bias, W_dec = decoder.weight.T (as stored),
         b_dec = decoder.bias; ReLU with decoder_norm="forward" (exactly its forward pass).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fastsae.formats.hooks import hook_aliases
from fastsae.formats.record import SAERecord, make_record

CONFIG_NAME = "final_config.yaml"
KEYS = ("encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias")
SAMPLES = re.compile(r"^samples_(\d+)\.pt$")


def detect(path: Path) -> bool:
    """A samples_<N>.pt file, or a run directory holding some."""
    if path.is_file():
        return path.suffix == ".pt"
    return any(SAMPLES.match(p.name) for p in path.iterdir())


def entries(path: Path) -> list[tuple[str, set[str], callable]]:
    """(hook, names it answers to, loader) for every SAE of the latest checkpoint at ``path``."""
    if path.is_dir():
        samples = {int(m.group(1)): p for p in path.iterdir() if (m := SAMPLES.match(p.name))}
        checkpoint = samples[max(samples)]  # the latest, as e2e_sae's SAETransformer.from_checkpoint
    else:
        checkpoint = path
    config_path = checkpoint.parent / CONFIG_NAME
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
        suffix = next((s for s in KEYS if key.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"{checkpoint}: unexpected key {key!r}; an e2e_sae SAE checkpoint holds "
                             f"<hook>.{{{', '.join(KEYS)}}} (other sparsifiers such as the codebook are not SAEs)")
        groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
    model = config.get("tlens_model_name") or config.get("tlens_model_path")
    found = []
    for prefix, group in sorted(groups.items()):
        hook = prefix.replace("-", ".")  # its ModuleDict keys write the hook's "." as "-"
        found.append((hook, hook_aliases(hook) | {prefix},
                      lambda checkpoint=checkpoint, group=group, hook=hook: _read(checkpoint, group, hook, model)))
    return found


def _read(checkpoint: Path, group: dict, hook: str, model) -> SAERecord:
    where = f"{checkpoint} ({hook})"
    missing = [key for key in KEYS if key not in group]
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
    return make_record(where, tensors, activation="relu", params={}, decoder_norm="forward", metadata=metadata,
                       dtype=encoder.dtype)
