"""Hook names across tools: TransformerLens hooks and sparsify's module hookpoints.

sparsify hooks Hugging Face modules (names under the model's base model; GPT-2's blocks are `h.L`,
most others' `layers.L`). An SAE reads a module's output; a transcoder (cfg transcode=true) reads
the module's input and writes its output. In TransformerLens names (checked against a GPT-2 run
through TransformerLens 4's bridge, where both sides' activations are equal):

    sparsify       SAE (its output)                   transcoder (its input -> its output)
    layers.L       blocks.(L+1).hook_resid_pre        blocks.L.hook_resid_pre->blocks.L.hook_resid_post
                   (= blocks.L.hook_resid_post)
    layers.L.mlp   blocks.L.hook_mlp_out              blocks.L.mlp.hook_in->blocks.L.hook_mlp_out
                   (= blocks.L.mlp.hook_out)          (the MLP's input = blocks.L.ln2.hook_out)

TransformerLens's blocks.L.ln2.hook_normalized is not the MLP's input: it is the LayerNorm's
output before the norm's weight and bias (in HookedTransformer and in the bridge alike), so a
transcoder that reads it has no sparsify hookpoint, and is refused by name. (The MLP's output
is hook_mlp_out in models whose block adds the MLP's output to the residual as it is: GPT-2,
Pythia, Llama, ...; not in Gemma 2 / 3, whose TransformerLens hook_mlp_out follows a post-MLP norm.)
"""

from __future__ import annotations

import re

from fastsae.spec import hook_in_out, transcoder_hook

_SPARSIFY_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)$")
_SPARSIFY_MLP = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)\.mlp$")
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_MLP_IN = re.compile(r"^blocks\.(\d+)\.(?:ln2\.hook_out|mlp\.hook_in)$")
_MLP_OUT = re.compile(r"^blocks\.(\d+)\.(?:hook_mlp_out|mlp\.hook_out)$")
_LN2_NORMALIZED = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")


def hook_from_sparsify(hookpoint: str, transcode: bool = False) -> str | None:
    """fastsae's name for a sparsify hookpoint (see the table above): for an SAE (transcode
    False) the module's output, for a transcoder "IN->OUT"; None for hookpoints with no
    TransformerLens equivalent known here (attention modules, ...)."""
    match = _SPARSIFY_LAYER.match(hookpoint)
    if match:
        layer = int(match.group(1))
        if transcode:
            return transcoder_hook(f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post")
        return f"blocks.{layer + 1}.hook_resid_pre"
    match = _SPARSIFY_MLP.match(hookpoint)
    if match:
        layer = int(match.group(1))
        if transcode:
            return transcoder_hook(f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
        return f"blocks.{layer}.hook_mlp_out"
    return None


def sparsify_layers_name(hookpoint: str) -> str | None:
    """The block list's name in a sparsify hookpoint (`h` in `h.3.mlp`, `layers` in `layers.3`),
    None where the hookpoint is none that hook_from_sparsify knows."""
    match = re.match(r"^(.*)\.\d+(?:\.mlp)?$", hookpoint)
    return match.group(1) if match and hook_from_sparsify(hookpoint) else None


def _residual_index(hook: str) -> int | None:
    """The residual stream a resid hook names, counted as blocks.i.hook_resid_pre = i."""
    match = _RESID_HOOK.match(hook)
    return None if match is None else int(match.group(1)) + (match.group(2) == "post")


def sparsify_hookpoint(hook: str, layers_name: str = "layers") -> str:
    """sparsify's hookpoint for a fastsae hook (layers_name "h" for GPT-2, whose blocks are `h.L`):
    blocks.L.hook_resid_pre -> `layers.(L-1)`, blocks.L.hook_resid_post -> `layers.L`,
    blocks.L.hook_mlp_out -> `layers.L.mlp`; transcoders: blocks.L.mlp.hook_in (or
    blocks.L.ln2.hook_out) -> blocks.L.hook_mlp_out -> `layers.L.mlp`, blocks.L.hook_resid_pre ->
    blocks.L.hook_resid_post -> `layers.L`. Anything else is a ValueError naming it."""
    hook_in, hook_out = hook_in_out(hook)
    if hook_in != hook_out:
        return _transcoder_hookpoint(hook, hook_in, hook_out, layers_name)
    match = _MLP_OUT.match(hook)
    if match:
        return f"{layers_name}.{int(match.group(1))}.mlp"
    match = _RESID_HOOK.match(hook)
    if match is None:
        raise ValueError(f"hook {hook!r} has no sparsify hookpoint here: sparsify reads module outputs, and only "
                         "blocks.L.hook_resid_pre (L >= 1), blocks.L.hook_resid_post and blocks.L.hook_mlp_out map "
                         "to them")
    layer = _residual_index(hook) - 1
    if layer < 0:
        raise ValueError(f"hook {hook!r} is the embedding output, which is no sparsify layer output; "
                         "sparsify hookpoints start at blocks.1.hook_resid_pre (= layers.0)")
    return f"{layers_name}.{layer}"


def _transcoder_hookpoint(hook: str, hook_in: str, hook_out: str, layers_name: str) -> str:
    mlp_in, mlp_out = _MLP_IN.match(hook_in), _MLP_OUT.match(hook_out)
    if mlp_in and mlp_out and mlp_in.group(1) == mlp_out.group(1):
        return f"{layers_name}.{int(mlp_in.group(1))}.mlp"
    resid_in, resid_out = _residual_index(hook_in), _residual_index(hook_out)
    if resid_in is not None and resid_out == resid_in + 1:
        return f"{layers_name}.{resid_in}"
    if _LN2_NORMALIZED.match(hook_in):
        layer = int(_LN2_NORMALIZED.match(hook_in).group(1))
        raise ValueError(
            f"transcoder {hook!r} has no sparsify hookpoint: {hook_in} is the LayerNorm's output before its weight "
            f"and bias (TransformerLens's hook_normalized), while sparsify's {layers_name}.{layer}.mlp transcoder "
            f"reads the MLP module's input, after them, so it would run a different function. Train it on "
            f"blocks.{layer}.mlp.hook_in (= blocks.{layer}.ln2.hook_out), or keep it in fastsae's format (or "
            "SAELens's, for a ReLU, JumpReLU or BatchTopK one)")
    raise ValueError(
        f"transcoder {hook!r} has no sparsify hookpoint: sparsify's transcoders read a module's input and write its "
        "output; fastsae maps blocks.L.mlp.hook_in (= blocks.L.ln2.hook_out) -> blocks.L.hook_mlp_out to "
        "`layers.L.mlp`, and blocks.L.hook_resid_pre -> blocks.L.hook_resid_post to `layers.L`")


def _single_aliases(hook: str) -> set[str]:
    aliases = {hook}
    match = _RESID_HOOK.match(hook)
    if match:
        layer = int(match.group(1))
        if match.group(2) == "pre" and layer >= 1:
            aliases.add(f"blocks.{layer - 1}.hook_resid_post")
        elif match.group(2) == "post":
            aliases.add(f"blocks.{layer + 1}.hook_resid_pre")
    for pattern, names in ((_MLP_IN, ("ln2.hook_out", "mlp.hook_in")), (_MLP_OUT, ("hook_mlp_out", "mlp.hook_out"))):
        match = pattern.match(hook)
        if match:
            aliases |= {f"blocks.{match.group(1)}.{name}" for name in names}
    return aliases


def hook_aliases(hook: str) -> set[str]:
    """Names that mean the same activation as ``hook`` (for matching a requested hook); for a
    transcoder "IN->OUT", every pairing of IN's and OUT's names."""
    hook_in, hook_out = hook_in_out(hook)
    if hook_in == hook_out:
        return _single_aliases(hook)
    return {hook} | {transcoder_hook(a, b) for a in _single_aliases(hook_in) for b in _single_aliases(hook_out)}
