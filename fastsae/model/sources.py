"""Where a model comes from: a local Hugging Face directory, or the hub (and whether it is reachable).

LanguageModel.load checks the source first, so a model that can be neither read locally nor
downloaded fails at once in one line instead of after the hub client's retries.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastsae._hub import hub_unavailable_reason


def is_local_model_dir(name_or_path: str) -> bool:
    return (Path(name_or_path) / "config.json").is_file()


class ModelUnavailableError(FileNotFoundError):
    """A model name that is neither a local directory nor reachable on the Hugging Face hub."""


def check_model_source(name: str) -> None:
    """Fail fast, in one line, when a model can be neither read locally nor downloaded, instead of
    the hub client's retries and traceback (about 30 s offline).

    A local directory is read as is. A path that does not exist is an error. A hub name is fine
    when its config is in the local Hugging Face cache; otherwise the hub must be allowed
    (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset) and reachable (a TCP connect, 3 s at most).
    """
    if Path(name).is_dir():
        if not is_local_model_dir(name):
            raise ModelUnavailableError(f"model directory {name} has no config.json (save the model and its "
                                        "tokenizer there with save_pretrained)")
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelUnavailableError(f"no model directory at {name}")
    repo = name
    try:  # a TransformerLens alias (gpt2-small, pythia-70m) is cached under its hub repo's name
        try:
            from transformer_lens.supported_models import get_official_model_name  # TL 4
        except ImportError:
            from transformer_lens.loading_from_pretrained import get_official_model_name  # TL 3
        repo = get_official_model_name(name)
    except Exception:  # not an alias TransformerLens knows (or no such helper): the name is the repo
        pass
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return
    except Exception:  # an invalid repo id or an old huggingface_hub: let the loader report it
        return
    reason = hub_unavailable_reason()
    if reason is not None:
        raise ModelUnavailableError(f"model {name!r} is not a local directory and not in the Hugging Face cache: it "
                                    "needs hub access (or set model.name to a local directory with the model saved "
                                    f"by save_pretrained); {reason}")


def load_tokenizer(path: str):
    """The tokenizer saved beside a local model, or None if there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def quiet_transformers_progress():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside the
    block, as they were after it. Downloads keep theirs: huggingface_hub draws those itself.

    Where transformers has set_tqdm_hook (5.24 does; it returns the hook it replaces) only its own
    bars are touched; older versions have only the switch shared with huggingface_hub, turned back
    on after if it was on.
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:
        previous = set_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
        try:
            yield
        finally:
            set_hook(previous)
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
