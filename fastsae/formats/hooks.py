"""Hook names across tools: TransformerLens residual hooks and sparsify's module outputs.

sparsify hooks Hugging Face module outputs: its `layers.L` (`h.L` on GPT-2) is the residual after
block L, fastsae's blocks.(L+1).hook_resid_pre (= blocks.L.hook_resid_post).
"""

from __future__ import annotations

import re

_SPARSIFY_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)$")
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


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


def hook_aliases(hook: str) -> set[str]:
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
