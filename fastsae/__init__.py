"""fastsae: end-to-end sparse autoencoders with fused Triton kernels."""

from fastsae import _kernels_package  # noqa: F401  (first: makes fastsae.kernels importable)
from fastsae._version import __version__
from fastsae import ops
from fastsae.sae import E2ESAE, SAEOutput, SparseCode, load_run
from fastsae.spec import SAESpec


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


__all__ = ["E2ESAE", "LanguageModel", "SAEOutput", "SAESpec", "SparseCode", "TrainConfig", "Trainer", "load_config",
           "load_run", "ops", "__version__"]
