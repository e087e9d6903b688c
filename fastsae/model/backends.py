"""The two TransformerLens APIs behind LanguageModel: loading and running each one.

    HookedTransformer  (TransformerLens 3.x): native start_at_layer / stop_at_layer.
    TransformerBridge  (TransformerLens 3.9 and 4.x): wraps the HF model; run_bridge stops before
                       the unembedding and skip_bridge_blocks skips the blocks before the start layer.
Both load without weight processing (no LayerNorm folding, no centering), so activations are the
HF model's and an SAE trained on one API fits the other; check_unprocessed refuses a model that was.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Iterator

from torch import Tensor

from fastsae.model.sources import is_local_model_dir, load_tokenizer, quiet_transformers_progress

Replacement = Callable[[Tensor], Tensor]


def transformer_lens_version() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = version("transformer-lens").split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


def hooked_transformer_class():
    """HookedTransformer, or None where TransformerLens no longer has it (4.x).

    Which API exists is decided by the installed version, not by catching ImportError: an import
    that fails inside TransformerLens or transformers (a broken dependency) is raised as itself
    instead of being reported as a missing API.
    """
    if transformer_lens_version() >= (4, 0):
        return None
    from transformer_lens import HookedTransformer

    return HookedTransformer


def bridge_class():
    """TransformerBridge, or None before TransformerLens 3.9 (raises what its import raises)."""
    if transformer_lens_version() < (3, 9):
        return None
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


@quiet_transformers_progress()  # no "Loading weights" bar in fastsae's output
def load_bridge(name_or_path: str, device, dtype):
    TransformerBridge = bridge_class()
    if TransformerBridge is None:
        raise ImportError(
            "api='bridge' needs transformer-lens >= 3.9 (TransformerBridge); "
            f"installed: {'.'.join(map(str, transformer_lens_version()))}"
        )
    # boot_transformers reads a local directory's config, weights and tokenizer offline.
    return TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype)


@quiet_transformers_progress()  # no "Loading weights" bar in fastsae's output
def load_hooked(name_or_path: str, device, dtype):
    HookedTransformer = hooked_transformer_class()
    if HookedTransformer is None:
        raise ImportError(
            "api='hooked' needs transformer-lens < 4 (HookedTransformer was removed in 4.0); "
            "use api='bridge' or api='auto'"
        )
    if not is_local_model_dir(name_or_path):
        return HookedTransformer.from_pretrained_no_processing(name_or_path, device=device, dtype=dtype)

    # HookedTransformer.from_pretrained only accepts official names. Its loading helpers do
    # accept a local directory, so build the model from them directly: this reads only the
    # directory and works offline. (GPT-2 configs must carry n_ctx, which save_pretrained
    # writes only when it was set; fastsae's own models set it.)
    import transformer_lens.loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    cfg = loading.get_pretrained_model_config(name_or_path, fold_ln=False, device=device, dtype=dtype)
    state_dict = loading.get_pretrained_state_dict(name_or_path, cfg, hf_model, dtype=dtype)
    with warnings.catch_warnings():  # TL 3.9 warns that HookedTransformer goes away in 4.0
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(cfg, load_tokenizer(name_or_path), move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device, print_details=False)  # no "Moving model to device" line


def check_unprocessed(model, api: str) -> None:
    """Refuse a model whose weights TransformerLens processed so that its residual stream is no
    longer the HF model's (an SAE trained on it would not fit the model anyone else runs)."""
    if api == "bridge":
        if getattr(model, "_weights_processed", False):
            raise ValueError(
                "this TransformerBridge's weights were processed (enable_compatibility_mode() or process_weights(): "
                "fold_ln, center_writing_weights, ...): its residual stream differs from the HF model's, so SAEs "
                "trained on it do not transfer. Boot it without processing (TransformerBridge.boot_transformers(name), "
                "or enable_compatibility_mode(no_processing=True))")
        return
    # HookedTransformer.from_pretrained's center_writing_weights subtracts each writing weight's
    # mean over d_model, W_E's included; no unprocessed model has rows with exactly zero mean.
    W_E = model.W_E.detach().float()
    if W_E.mean(-1).abs().max() <= 1e-5 * W_E.abs().max():
        raise ValueError(
            "this HookedTransformer was loaded with center_writing_weights (HookedTransformer.from_pretrained's "
            "default): its residual stream is the HF model's minus its mean, so SAEs trained on it do not "
            "transfer. Load it with HookedTransformer.from_pretrained_no_processing(name)")
    if str(getattr(model.cfg, "normalization_type", "")).endswith("Pre"):
        warnings.warn(
            "this HookedTransformer has its LayerNorm weights folded (fold_ln): the residual stream is the HF "
            "model's, but hooks inside the LayerNorms (ln*.hook_scale / hook_normalized) are not; "
            "from_pretrained_no_processing avoids that", stacklevel=3)


class _ReachedUnembed(Exception):
    """Raised from a hook on the bridge's unembedding input to end the forward before the logits.

    Our own exception, caught by our own code: it does not depend on how a TransformerLens version
    handles its StopAtLayerException. It passes through the HF forward and the bridge's `finally`
    blocks, which restore their state.
    """

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden


def run_hooked(lm, tokens, hooks, start_layer, start_acts) -> Tensor:
    """HookedTransformer: native start_at_layer / stop_at_layer."""
    # stop_at_layer=n_layers returns the residual after the last block: no ln_final, no logits.
    with lm.hooks(hooks):
        if start_layer is None:
            resid = lm.model(tokens, stop_at_layer=lm.n_layers)
        else:
            resid = lm.model(start_acts, start_at_layer=start_layer, stop_at_layer=lm.n_layers)
    return lm.final_hidden(resid)


def run_bridge(lm, tokens, hooks, start_layer, start_acts) -> Tensor:
    """TransformerBridge: the HF forward, ended at the unembedding's input."""
    # The bridge's stop_at_layer=n_layers would run on to the logits (no block has that
    # index), so we end the pass ourselves at the unembedding's input, which is the final
    # hidden state exactly as the model feeds it to W_U.
    def stop(acts, hook):
        raise _ReachedUnembed(acts)

    all_hooks = list(hooks) + [("unembed.hook_in", stop)]
    skip = contextlib.nullcontext()
    if start_layer is not None:
        # The bridge runs the HF forward from the tokens. Blocks before start_layer are made
        # pass-throughs (nothing computed), and the first hook at the start block's resid_pre
        # swaps in the cached residual, ahead of any replacement there.
        inject = replacement_hook("start_acts", lambda acts: start_acts.to(acts.dtype))
        all_hooks.insert(0, (f"blocks.{start_layer}.hook_resid_pre", inject))
        skip = skip_bridge_blocks(lm, start_layer)
    probe = probe_block_output(lm) if start_layer is None else contextlib.nullcontext()
    try:
        with lm.hooks(all_hooks), skip, probe:
            lm.model(tokens)
    except _ReachedUnembed as reached:
        return reached.hidden
    raise RuntimeError("the bridge's forward ended without reaching unembed.hook_in")


@contextlib.contextmanager
def skip_bridge_blocks(lm, n: int) -> Iterator[None]:
    """Replace the forward of HF blocks 0..n-1 by the identity for the duration of the block.

    An instance attribute `forward` shadows the class method for nn.Module.__call__; deleting
    it restores the original. The bridge's block wrapper still fires its hooks around the
    identity, on values nobody reads (hooks before the start block are refused in spliced_run).
    """
    as_tuple = lm._block_returns_tuple

    def identity(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + (None,) * (as_tuple - 1) if as_tuple else hidden

    patched = []
    try:
        for block in list(lm.model.blocks)[:n]:
            inner = block.original_component
            inner.forward = identity
            patched.append(inner)
        yield
    finally:
        for inner in patched:
            del inner.forward


@contextlib.contextmanager
def probe_block_output(lm) -> Iterator[None]:
    """Note once whether the HF blocks return a tuple (and of what length) or a tensor."""
    if lm._block_returns_tuple is not None:
        yield
        return

    def record(module, args, output):
        lm._block_returns_tuple = len(output) if isinstance(output, tuple) else 0

    handle = lm.model.blocks[0].original_component.register_forward_hook(record)
    try:
        yield
    finally:
        handle.remove()


def replacement_hook(name: str, fn: Replacement):
    def hook(acts, hook):
        new = fn(acts)
        if not isinstance(new, Tensor) or new.shape != acts.shape:
            raise ValueError(
                f"the replacement at {name!r} must return a tensor of shape {list(acts.shape)}, "
                f"got {describe(new)}"
            )
        return new

    return hook


def describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def has_vocabulary(tokenizer) -> bool:
    """Whether a tokenizer holds a vocabulary: TransformerLens's bridge gives a model directory
    without tokenizer files an empty GPT2Tokenizer (its special tokens only), not None."""
    if tokenizer is None:
        return False
    try:
        return len(tokenizer.get_vocab()) > len(set(tokenizer.all_special_ids))
    except (AttributeError, NotImplementedError):
        return True
