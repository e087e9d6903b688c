"""SAEConfig: an SAE's config under the names SAELens and SAEBench read (`sae.cfg`).

SAEBench's custom-SAE contract (sae_bench/custom_saes/README.md, CustomSAEConfig) wants `sae.cfg`
with d_in, d_sae, hook_name, hook_layer, model_name, dtype, device and a few fields its core eval
reads as SAELens's (hook_head_index, context_size, architecture, apply_b_dec_to_input,
normalize_activations, prepend_bos, model_from_pretrained_kwargs, ...), and `cfg.to_dict()`.
E2ESAE.cfg is one object per SAE, kept: SAEBench's load_and_format_sae standardises it in place
(sets hook_layer, architecture_str, metadata, ...) and reads those attributes later. Each read
refreshes the fields the SAE decides (SAE_FIELDS: shape, dtype, device, hook, model, activation)
and keeps whatever else a caller set.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook: str | None) -> int:
    """The block a hook belongs to (blocks.L.* -> L), 0 for hooks before the first block or
    unnamed ones: SAEBench runs the model to stop_at_layer = hook_layer + 1 to read the hook."""
    match = _BLOCK.match(hook or "")
    return int(match.group(1)) if match else 0


@dataclass
class SAEConfig:
    """The SAELens / SAEBench view of an E2ESAE's config.

    architecture is fastsae's activation name ("relu", "topk", "jumprelu", "batchtopk"); SAEBench
    only asks whether it is "gated". apply_b_dec_to_input is False and normalize_activations "none"
    because fastsae's encoder reads x itself (a SAELens b_dec subtraction is folded into b_enc on
    load). activation_fn_kwargs holds the activation's hyperparameters.

    A transcoder "IN->OUT" is described as SAELens's TranscoderConfig does: hook_name and hook_layer
    are where it reads (IN), d_out, hook_name_out and hook_layer_out (and hook_head_index_out) where
    it writes (OUT). An SAE has none of the *_out fields (None here, left out of to_dict()).
    """

    model_name: str | None
    d_in: int
    d_sae: int
    hook_name: str | None
    hook_layer: int
    architecture: str
    activation_fn_kwargs: dict
    dtype: str
    device: str
    hook_head_index: int | None = None
    context_size: int | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    prepend_bos: bool = True
    finetuning_scaling_factor: bool = False
    model_from_pretrained_kwargs: dict = field(default_factory=dict)
    dataset_path: str = ""
    neuronpedia_id: str | None = None

    d_out: int | None = None  # a transcoder's (SAELens TranscoderConfig's names)
    hook_name_out: str | None = None
    hook_layer_out: int | None = None
    hook_head_index_out: int | None = None

    architecture_str: str = ""  # SAELens 6's architecture as a string, which SAEBench's core eval reads
    activation_fn_str: str = ""

    def __post_init__(self):
        self.architecture_str = self.activation_fn_str = self.architecture

    def refresh(self, current: "SAEConfig") -> "SAEConfig":
        """Take the SAE-decided fields (SAE_FIELDS) of ``current``; keep every other attribute."""
        for name in SAE_FIELDS:
            setattr(self, name, getattr(current, name))
        return self

    def to_dict(self) -> dict:
        """The fields by name; an SAE's without the transcoder fields (*_out), as SAELens's SAEConfig."""
        out = dataclasses.asdict(self)
        if self.d_out is None:
            for name in TRANSCODER_FIELDS:
                out.pop(name)
        return out


TRANSCODER_FIELDS = ("d_out", "hook_name_out", "hook_layer_out", "hook_head_index_out")


SAE_FIELDS = ("model_name", "d_in", "d_sae", "hook_name", "hook_layer", "architecture", "architecture_str",
              "activation_fn_str", "activation_fn_kwargs", "dtype", "device", "neuronpedia_id", "d_out",
              "hook_name_out", "hook_layer_out")
