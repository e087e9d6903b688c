"""fastsae: end-to-end sparse autoencoders with fused Triton kernels."""

__version__ = "0.1.0"

from fastsae import ops  # noqa: E402
from fastsae.sae import E2ESAE, SAEOutput, SparseCode  # noqa: E402

# The trainer and the model adapter import transformer-lens (seconds): load them on first use.
_LAZY = {
    "Trainer": "fastsae.train",
    "TrainConfig": "fastsae.train",
    "load_config": "fastsae.train",
    "LanguageModel": "fastsae.model",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsae' has no attribute {name!r}")


__all__ = ["E2ESAE", "LanguageModel", "SAEOutput", "SparseCode", "TrainConfig", "Trainer", "load_config", "ops",
           "__version__"]
