"""What a dashboard reads off the weights: each latent's logit effect, and the token texts.

Logit effect. A latent adds a multiple of its decoder direction d (the unit row of W_dec) to the
residual stream. Its direct effect on the logits goes through the model's final norm and the
unembedding. Linearised, LayerNorm(x + a d) - LayerNorm(x) = (a / sigma(x)) * gamma * (c(d) -
(n . c(d)) n) + O(a^2), with c(d) = d - mean(d), n the token's normalised residual and gamma the
norm's gain (RMSNorm: no centring). As TransformerLens's fold_ln + center_writing_weights (and so
SAE-Vis and Neuronpedia) do, two parts are left out: the per-token factor 1 / sigma(x), positive and
the same for every vocabulary entry, so the ranking of the tokens does not depend on it; and the
projection term, which moves the output along the token's own residual and vanishes where that
is orthogonal to c(d). What remains depends on the latent alone:

    logit_effect[i] = (gamma * c(d_i)) @ W_U            (b_U and soft-capping left out)

The norm is recognised by its class (LayerNorm, RMSNorm, Gemma's 1 + weight RMSNorm, their
weight-less "Pre" variants) and the formula checked against the module's output on random
inputs; a norm that does not pass is left out (W_dec @ W_U), and the note says so.
"""

from __future__ import annotations

import torch

from fastsae.ops.checks import chunk_rows


def _norm_module(lm):
    module = lm.model.ln_final
    return getattr(module, "original_component", None) or module


def final_norm(lm) -> tuple[torch.Tensor | None, bool, str]:
    """(gain [d_model] or None, whether the norm centres, a sentence saying what was done)."""
    module = _norm_module(lm)
    name = type(module).__name__
    weight = getattr(module, "w", None)
    if weight is None:
        weight = getattr(module, "weight", None)
    rms = "RMS" in name
    centres = not rms and "LayerNorm" in name
    if weight is not None and "Gemma" in name and rms:
        weight = 1.0 + weight.float()  # Gemma's RMSNorm multiplies by (1 + weight)
    gain = None if weight is None else weight.detach().float().reshape(-1)
    if "Norm" not in name or not _formula_holds(lm, gain, centres, rms):
        return None, False, (f"logit effect = W_dec[i] @ W_U: the model's final norm ({name}) was not recognised, "
                             "so it is left out")
    kind = "RMSNorm" if rms else "LayerNorm"
    what = ["its gain folded in" if gain is not None else "it has no gain",
            "the direction centred" if centres else "no centring (RMSNorm)"]
    return gain, centres, (f"logit effect = (gamma * {'center(d)' if centres else 'd'}) @ W_U, d the unit decoder "
                           f"direction: the final {kind} ({name}) linearised as TransformerLens's fold_ln does, "
                           f"{', '.join(what)}; left out: its per-token 1/scale (it does not change the ranking) and the "
                           "projection on the token's own residual; "
                           "b_U and soft-capping left out")


@torch.no_grad()
def _formula_holds(lm, gain, centres: bool, rms: bool) -> bool:
    """Whether final_hidden(x) = gain * normalise(x) + bias on random inputs (to 1e-3 relative)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, lm.d_model, generator=g).to(lm.device, lm.dtype) * 3 + 0.5
    try:
        out = lm.final_hidden(x).float()
        bias = lm.final_hidden(torch.zeros_like(x[:1])).float()  # LayerNorm(0) = bias (RMSNorm: 0)
    except Exception:
        return False
    x = x.float()
    if centres:
        x = x - x.mean(-1, keepdim=True)
    normalised = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    expected = normalised * (gain.to(x.device) if gain is not None else 1.0) + bias
    return bool(((out - expected).norm() <= 1e-3 * out.norm().clamp_min(1e-6)).item())


@torch.no_grad()
def logit_effect(W_dec: torch.Tensor, lm, k: int = 10) -> tuple[dict[str, torch.Tensor], str]:
    """Each latent's ``k`` most promoted and most suppressed tokens (see the module docstring).

    Returns ({"top_ids", "top_values", "bottom_ids", "bottom_values"}: [n_latents, k] each, on the
    CPU; bottom largest-negative first), and the note saying how the final norm was treated.
    The [n_latents, d_vocab] product is formed in blocks of latents, never whole.
    """
    gain, centres, note = final_norm(lm)
    W_U = lm.W_U.detach()
    device = W_U.device
    k = min(k, W_U.shape[1])
    out = {name: [] for name in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    rows = chunk_rows(W_U.shape[1])
    for start in range(0, W_dec.shape[0], rows):
        d = W_dec[start:start + rows].detach().to(device, torch.float32)
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if centres:
            d = d - d.mean(dim=1, keepdim=True)
        if gain is not None:
            d = d * gain.to(device)
        effect = d @ W_U.float()
        top = effect.topk(k, dim=1)
        bottom = effect.topk(k, dim=1, largest=False)
        out["top_ids"].append(top.indices.cpu())
        out["top_values"].append(top.values.cpu())
        out["bottom_ids"].append(bottom.indices.cpu())
        out["bottom_values"].append(bottom.values.cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}, note


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (bytes_to_unicode) inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_texts(tokenizer, d_vocab: int) -> tuple[list[str], list[int]]:
    """The exact text of every token id below d_vocab, and the ids shown as bytes.

    Each id is decoded alone (no clean-up of spaces). A byte-level BPE piece that is not whole
    UTF-8 on its own (part of a multi-byte character) decodes to U+FFFD; its text is then its bytes,
    the ones that are not whole characters written "\\xe2" (read from the piece's byte-level
    alphabet), and its id is listed in the second result so the page can mark the escapes. Ids
    past the tokenizer's vocabulary (a model's padded embedding) get "<unused id>".
    """
    n_known = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(min(d_vocab, n_known))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    decoder = None
    byte_ids = []
    for i, text in enumerate(texts):
        if "\ufffd" not in text:
            continue
        piece = tokenizer.convert_ids_to_tokens(i)
        decoder = decoder or _byte_decoder()
        if isinstance(piece, str) and piece and all(c in decoder for c in piece):
            raw = bytes(decoder[c] for c in piece)
            texts[i] = raw.decode("utf-8", errors="backslashreplace")
            byte_ids.append(i)
    texts += [f"<unused {i}>" for i in range(len(texts), d_vocab)]
    return texts, byte_ids
