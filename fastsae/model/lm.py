"""The language-model side of e2e SAE training: a thin adapter over a frozen TransformerLens model.

An e2e SAE is trained through the model: the SAE replaces the activation at a hook point, the rest
of the model runs on its output, and the loss compares the output distribution with the clean one.
This file gives the trainer the three passes it needs and nothing more:

    clean_run    once per batch, no grad: final hidden state + the activations the SAEs read.
    spliced_run  the model with SAEs spliced in at their hooks, optionally starting from the
                 cached residual at the first SAE's block, so the blocks before it run once.
    final_hidden the final layer norm, so that final_hidden(resid) @ W_U + b_U are the logits.

Neither pass computes logits: the fused linear-KL op takes the final hidden states and W_U and never
stores the N x V logits. `logits()` exists for tests and evaluation only.

Two TransformerLens APIs are supported behind one interface (HookedTransformer on 3.x, the
TransformerBridge on 3.9 and 4.x): fastsae.model.backends loads and runs each, and
fastsae.model.sources says where a model comes from (a local directory or the hub).

This file is longer than the house's ~400 lines because the adapter's public surface (loading,
hook names and their order, the three passes, the logit-free check, tokenizer helpers) is one
interface that the trainer, the evaluator and the analyses all use; splitting it would split that.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from fastsae.model import backends
from fastsae.model.backends import Replacement, describe
from fastsae.model.sources import check_model_source

# The TransformerLens hook names that work on both APIs (the bridge maps them to its own names).
LEGACY_BLOCK_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
_EMBED_STAGE = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.")
_FINAL_STAGE = ("ln_final.", "unembed.", "hook_unembed")

class _Collected(Exception):
    """Raised from a hook once every activation `activations()` asked for is cached: the rest of
    the model does not run."""


class LanguageModel:
    """A frozen TransformerLens model with the passes e2e SAE training needs.

    Build it with `LanguageModel.load(name_or_path)` or `LanguageModel.wrap(model)`.
    Attributes: model, tokenizer (or None), api ("bridge" | "hooked"), d_model, n_layers, d_vocab,
    n_ctx, device, dtype, W_U [d_model, d_vocab], b_U [d_vocab] or None.
    """

    def __init__(self, model: torch.nn.Module, api: str):
        if api not in ("bridge", "hooked"):
            raise ValueError(f"api must be 'bridge' or 'hooked', got {api!r}")
        self.model = model
        self.api = api
        self.tokenizer = getattr(model, "tokenizer", None)
        if not backends.has_vocabulary(self.tokenizer):  # the bridge's stand-in for a directory without one
            self.tokenizer = None

        # Frozen: no gradient and so no optimizer state for any LM weight. The bridge's
        # parameters() already yields the wrapped HF model's; nn.Module.parameters catches the rest.
        for p in model.parameters():
            p.requires_grad_(False)
        for p in torch.nn.Module.parameters(model):
            p.requires_grad_(False)
        model.eval()  # dropout off: the clean and the spliced pass must see the same model

        cfg = model.cfg
        self.d_model = int(cfg.d_model)
        self.n_layers = int(cfg.n_layers)
        self.n_ctx = int(cfg.n_ctx)
        if api == "hooked":
            self.W_U = model.unembed.W_U
            self.b_U = model.unembed.b_U
        else:
            # The exact tensors of the HF lm_head: W_U is a view of its weight. (The bridge gives
            # GPT-2's bias-free lm_head a zero bias; it is what the model adds, so we keep it.)
            head = getattr(model.unembed, "original_component", None)
            self.W_U = model.W_U
            self.b_U = getattr(head, "bias", None)
        self.d_vocab = int(self.W_U.shape[1])
        self.device = self.W_U.device
        self.dtype = self.W_U.dtype
        # Whether the HF blocks return tuples (older transformers) or bare tensors (5.x); seen on
        # the first full bridge run and used by the block skip in _skip_bridge_blocks.
        self._block_returns_tuple: int | None = None
        backends.check_unprocessed(model, api)

    # ---------------------------------------------------------------- construction

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        api: str = "auto",
    ) -> "LanguageModel":
        """Load a model by TransformerLens/HF name ("gpt2"), local HF directory, or "embedded".

        A local directory holds a model saved with save_pretrained and its tokenizer; it loads
        offline. api: "auto" | "bridge" | "hooked". "auto" takes the TransformerBridge on
        TransformerLens >= 4 (the only API there) and HookedTransformer on 3.x: on 3.x the bridge
        cannot start at a layer, while HookedTransformer skips the embedding and the blocks before
        the start natively, and it is the API SAELens uses on 3.x.
        Both load without weight processing (no LayerNorm folding, no centering), so activations
        are the HF model's and an SAE trained on one API fits the other.
        """
        if api not in ("auto", "bridge", "hooked"):
            raise ValueError(f"api must be one of 'auto', 'bridge', 'hooked', got {api!r}")
        if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
            raise ValueError(f"name_or_path must be a model name or a directory, got {name_or_path!r}")
        name_or_path = str(name_or_path)
        if name_or_path == "embedded":
            from fastsae.model.embedded import ensure_embedded_model

            name_or_path = str(ensure_embedded_model())

        check_model_source(name_or_path)

        if api == "auto":
            api = "hooked" if backends.transformer_lens_version()[0] < 4 else "bridge"
            if api == "hooked":
                # TL 3.x's HookedTransformer knows architectures by name: Gemma-2/3, OLMo and
                # local paths with "llama" in them fail there, while the bridge loads them all.
                try:
                    return cls(backends.load_hooked(name_or_path, device, dtype), "hooked")
                except Exception as error:
                    if backends.bridge_class() is None:
                        raise
                    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    print(f"fastsae: HookedTransformer cannot load {name_or_path} ({reason[:200]}); "
                          "using the TransformerBridge (model.api=bridge)", file=sys.stderr, flush=True)
                    api = "bridge"
        if api == "hooked":
            try:
                model = backends.load_hooked(name_or_path, device, dtype)
            except ImportError:
                raise
            except Exception as error:
                hint = "; set model.api=bridge (the TransformerBridge loads every architecture)" if backends.bridge_class() else ""
                raise ValueError(f"HookedTransformer cannot load {name_or_path}: {error}{hint}") from error
        else:
            model = backends.load_bridge(name_or_path, device, dtype)
        return cls(model, api)

    @classmethod
    def wrap(cls, model: torch.nn.Module) -> "LanguageModel":
        """Adapt a HookedTransformer or TransformerBridge built elsewhere (it gets frozen)."""
        HookedTransformer = backends.hooked_transformer_class()
        TransformerBridge = backends.bridge_class()
        if HookedTransformer is not None and isinstance(model, HookedTransformer):
            return cls(model, "hooked")
        if TransformerBridge is not None and isinstance(model, TransformerBridge):
            return cls(model, "bridge")
        raise TypeError(
            f"model must be a transformer_lens HookedTransformer or TransformerBridge, got {type(model).__name__}"
        )

    # ---------------------------------------------------------------- hook names

    def hook_names(self) -> list[str]:
        """Every hook point name this model accepts, legacy block names included."""
        names = set(self.model.hook_dict.keys())
        for layer in range(self.n_layers):
            names.update(f"blocks.{layer}.{h}" for h in LEGACY_BLOCK_HOOKS)
        return sorted(names, key=_hook_sort_key)

    def validate_hook(self, name: str) -> str:
        """Return `name` if it is a hook point of this model, else raise ValueError naming it."""
        if not isinstance(name, str):
            raise ValueError(f"hook name must be a string, got {type(name).__name__}: {name!r}")
        if name in self.model.hook_dict:
            return name
        match = _BLOCK_HOOK.match(name)
        if match and 0 <= int(match.group(1)) < self.n_layers and name.split(".", 2)[2] in LEGACY_BLOCK_HOOKS:
            return name
        examples = ", ".join(f"blocks.{min(1, self.n_layers - 1)}.{h}" for h in LEGACY_BLOCK_HOOKS)
        hint = ""
        if match and int(match.group(1)) >= self.n_layers:
            hint = f" (the model has {self.n_layers} blocks: 0..{self.n_layers - 1}"
            if name == f"blocks.{self.n_layers}.hook_resid_pre":  # e.g. a sparsify SAE of the last layer
                hint += f"; the residual after the last block is blocks.{self.n_layers - 1}.hook_resid_post"
            hint += ")"
        raise ValueError(
            f"unknown hook point {name!r}{hint}. Valid names look like: {examples}; "
            f"LanguageModel.hook_names() lists all {len(self.hook_names())}."
        )

    def block_index(self, hook_name: str) -> int:
        """The block that must run to produce `hook_name`: L for blocks.L.*, -1 for the embedding
        hooks (before block 0), n_layers for ln_final/unembed hooks (after the last block)."""
        self.validate_hook(hook_name)
        match = _BLOCK_HOOK.match(hook_name)
        if match:
            return int(match.group(1))
        if hook_name.startswith(_EMBED_STAGE):
            return -1
        if hook_name.startswith(_FINAL_STAGE):
            return self.n_layers
        raise ValueError(f"cannot tell which block produces hook {hook_name!r}")

    def start_point(self, hook_name: str) -> str:
        """The resid_pre hook to cache in the clean run so a spliced run for an SAE at `hook_name`
        can start at its block: blocks.L.hook_resid_pre with L = block_index(hook_name)."""
        layer = self.block_index(hook_name)
        if not 0 <= layer < self.n_layers:
            raise ValueError(
                f"hook {hook_name!r} is not inside a block, so a spliced run cannot start from a "
                "cached residual; call spliced_run without start_hook/start_acts"
            )
        return f"blocks.{layer}.hook_resid_pre"

    # ---------------------------------------------------------------- passes

    def final_hidden(self, resid: Tensor) -> Tensor:
        """The final layer norm: cap(final_hidden(resid after the last block) @ W_U + b_U) = logits,
        cap the final-logit soft-capping (see logit_softcap)."""
        return self.model.ln_final(resid)

    @property
    def logit_softcap(self) -> float | None:
        """The model's final-logit soft-capping c (logits = c * tanh(z / c); Gemma-2: 30), or None.

        Read from the TransformerLens config (`output_logits_soft_cap`, where -1 / 0 mean off), or
        from the HF config (`final_logit_softcapping`) where a bridge's config lacks it.
        """
        cap = getattr(self.model.cfg, "output_logits_soft_cap", None)
        if cap is None:
            hf_config = getattr(getattr(self.model, "original_model", None), "config", None)
            cap = getattr(hf_config, "final_logit_softcapping", None)
        return float(cap) if cap is not None and cap > 0 else None

    def check_logit_free_path(self, n_tokens: int = 8) -> None:
        """Refuse a model whose logits the logit-free path does not reproduce.

        fastsae's KL and CE never build logits: they take the final hidden state, W_U, b_U and
        logit_softcap. This runs `n_tokens` tokens both ways, the logit-free path
        (cap(final hidden @ W_U + b_U)) and the model's own forward, and raises ValueError when they
        differ by more than the model dtype's rounding: a model that scales, shifts or otherwise
        transforms its logits would train on a different objective without a word.
        """
        n = max(1, min(n_tokens, self.n_ctx))
        # Spread-out ids (a prime stride) so that the check does not hinge on one embedding row.
        tokens = (torch.arange(n, device=self.device) * 7919 % self.d_vocab).unsqueeze(0)
        with torch.no_grad():
            hidden, _ = self.clean_run(tokens)
            free = hidden.float() @ self.W_U.float()
            if self.b_U is not None:
                free = free + self.b_U.float()
            cap = self.logit_softcap
            if cap is not None:
                free = cap * torch.tanh(free / cap)
            own = self.logits(tokens).float()
        if own.shape != free.shape:
            raise ValueError(f"the model's logits have shape {list(own.shape)}, but its final hidden state @ W_U "
                             f"gives {list(free.shape)}: fastsae cannot compute this model's KL without logits")
        scale = own.abs().max().clamp_min(1.0).item()
        diff = (free - own).abs().max().item()
        # 4 units of the model dtype's rounding at the largest logit (1e-5 at least, for fp32's
        # matmul reduction order).
        tolerance = max(4 * torch.finfo(self.dtype).eps, 1e-5) * scale
        if not diff <= tolerance:
            softcap = f", soft-capped at {cap:g}" if cap is not None else ""
            raise ValueError(
                f"the logit-free path (final hidden state @ W_U + b_U{softcap}) does not reproduce this "
                f"model's logits: max difference {diff:.3g} at logits up to {scale:.3g} (tolerance "
                f"{tolerance:.3g}). The model transforms its logits in a way fastsae does not model (a "
                "scale, an offset, a cap it does not declare), so its KL and CE would train on a "
                "different objective; this model is not supported")

    def clean_run(self, tokens: Tensor, cache_hooks: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        """One full pass without gradient and without logits.

        Returns the final hidden state [B, T, d_model] (after the final layer norm) and the
        activations at `cache_hooks`, detached.
        """
        tokens = self._check_tokens(tokens)
        names = [self.validate_hook(h) for h in cache_hooks]
        cache: dict[str, Tensor] = {}
        hooks = [(name, _capture_hook(cache, name, detach=True)) for name in names]
        with torch.no_grad():
            hidden = self._run(tokens, hooks)
        return hidden, cache

    def activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        """The clean activations at `hooks` (detached), running the model only as far as the last
        of them: a local SAE step needs no later block and no logits."""
        tokens = self._check_tokens(tokens)
        names = [self.validate_hook(h) for h in hooks]
        cache: dict[str, Tensor] = {}

        def capture(name):
            def hook(acts, hook):
                cache[name] = acts.detach()
                if len(cache) == len(names):
                    raise _Collected

            return hook

        with torch.no_grad():
            try:
                with self.hooks([(name, capture(name)) for name in names]):
                    self.model(tokens)
            except _Collected:
                pass
        if len(cache) != len(names):
            raise RuntimeError(f"the model did not produce the hooks {sorted(set(names) - set(cache))}")
        return cache

    def activation_widths(self, hooks: Sequence[str]) -> dict[str, int]:
        """{hook: the width of its activation}, from one 2-token run as far as the last of them (an
        MLP's hidden layer is d_mlp wide, the residual stream d_model)."""
        probe = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        return {name: acts.shape[-1] for name, acts in self.activations(probe, sorted(set(hooks))).items()}

    def spliced_run(
        self,
        tokens: Tensor,
        replacements: dict[str, Replacement],
        *,
        start_hook: str | None = None,
        start_acts: Tensor | None = None,
        capture_hooks: Sequence[str] = (),
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The model with each hook in `replacements` replaced by fn(activation); no logits.

        Returns the final hidden state and the activations at `capture_hooks` (not detached: the
        downstream MSE needs their gradient). A capture at a replaced hook sees the replacement.
        Gradient is on or off as the caller set it.

        With start_hook (= start_point(first SAE hook)) and start_acts (its activation from the
        clean run), the blocks before start_hook's block are not run: the pass begins at that
        block from start_acts, and a replacement at that same resid_pre hook still fires.
        """
        tokens = self._check_tokens(tokens)
        if not isinstance(replacements, dict):
            raise ValueError(f"replacements must be a dict of hook name -> callable, got {type(replacements).__name__}")
        for name, fn in replacements.items():
            self.validate_hook(name)
            if not callable(fn):
                raise ValueError(f"replacements[{name!r}] must be callable, got {type(fn).__name__}")
        capture_names = [self.validate_hook(h) for h in capture_hooks]

        start_layer = None
        if (start_hook is None) != (start_acts is None):
            raise ValueError("start_hook and start_acts must be given together (or neither)")
        if start_hook is not None:
            start_layer = self._check_start(start_hook, start_acts, tokens, list(replacements) + capture_names)

        captured: dict[str, Tensor] = {}
        hooks = [(name, backends.replacement_hook(name, fn)) for name, fn in replacements.items()]
        hooks += [(name, _capture_hook(captured, name, detach=False)) for name in capture_names]
        hidden = self._run(tokens, hooks, start_layer=start_layer, start_acts=start_acts)
        return hidden, captured

    def logits(self, tokens: Tensor, replacements: dict[str, Replacement] | None = None) -> Tensor:
        """Full logits [B, T, V], optionally with replacements. Materializes B*T*V: tests/eval only."""
        tokens = self._check_tokens(tokens)
        hooks = [(self.validate_hook(n), backends.replacement_hook(n, fn)) for n, fn in (replacements or {}).items()]
        with self.hooks(hooks):
            return self.model(tokens)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: list[tuple[str, Callable]]) -> Iterator[None]:
        """Add TransformerLens forward hooks for the duration of the block; always removed, even
        when the block raises."""
        # TransformerLens' context manager removes the hooks it added in a `finally`; hooks the
        # caller attached outside it are left alone.
        with self.model.hooks(fwd_hooks=fwd_hooks, reset_hooks_end=True):
            yield

    def remove_hooks(self) -> None:
        """Remove every temporary (non-permanent) hook from the model."""
        self.model.reset_hooks(including_permanent=False)

    def __enter__(self) -> "LanguageModel":
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    # ---------------------------------------------------------------- tokenizer helpers

    def tokenize(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (no BOS)."""
        tok = self._require_tokenizer()
        if isinstance(texts, str):
            texts = [texts]
        return [tok.encode(t, add_special_tokens=False) for t in texts]

    def to_tokens(self, texts: str | Sequence[str]) -> Tensor:
        """LongTensor [B, T] on the model's device; the texts must tokenize to the same length."""
        ids = self.tokenize(texts)
        lengths = {len(i) for i in ids}
        if len(lengths) != 1:
            raise ValueError(f"to_tokens needs texts of equal token length, got lengths {sorted(lengths)}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    # ---------------------------------------------------------------- internals

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead")
        return self.tokenizer

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, pos], got {describe(tokens)}")
        if tokens.shape[1] > self.n_ctx:
            raise ValueError(f"tokens has {tokens.shape[1]} positions, more than the model's n_ctx={self.n_ctx}")
        return tokens.to(self.device, torch.long)

    def _check_start(self, start_hook: str, start_acts: Tensor, tokens: Tensor, hook_names: list[str]) -> int:
        self.validate_hook(start_hook)
        layer = self.block_index(start_hook)
        if start_hook != f"blocks.{layer}.hook_resid_pre":
            raise ValueError(
                f"start_hook must be a blocks.L.hook_resid_pre hook (see start_point()), got {start_hook!r}"
            )
        expected = (*tokens.shape, self.d_model)
        if not isinstance(start_acts, Tensor) or tuple(start_acts.shape) != expected:
            raise ValueError(f"start_acts must have shape {list(expected)}, got {describe(start_acts)}")
        for name in hook_names:
            if self.block_index(name) < layer:
                raise ValueError(
                    f"hook {name!r} comes before start_hook {start_hook!r}: a run starting at block "
                    f"{layer} never computes it; start at or before block {self.block_index(name)}"
                )
        return layer

    def _run(self, tokens: Tensor, hooks: list, start_layer: int | None = None, start_acts: Tensor | None = None) -> Tensor:
        if self.api == "hooked":
            return backends.run_hooked(self, tokens, hooks, start_layer, start_acts)
        return backends.run_bridge(self, tokens, hooks, start_layer, start_acts)

def _capture_hook(store: dict, name: str, *, detach: bool):
    def hook(acts, hook):
        store[name] = acts.detach() if detach else acts

    return hook


def _hook_sort_key(name: str):
    match = _BLOCK_HOOK.match(name)
    return (0 if name.startswith(_EMBED_STAGE) else 1 if match else 2, int(match.group(1)) if match else 0, name)
