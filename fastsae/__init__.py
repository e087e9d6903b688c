"""fastsae: end-to-end sparse autoencoders with fused Triton kernels."""

from fastsae import _openmp

_openmp.shorten_spin_wait()  # before torch loads its OpenMP runtime (fastsae/_openmp.py)

from fastsae import _kernels_package  # noqa: E402, F401  (makes fastsae.kernels importable)
from fastsae._version import __version__  # noqa: E402
from fastsae import ops  # noqa: E402
from fastsae.sae import E2ESAE, SAEOutput, SparseCode, load_run  # noqa: E402
from fastsae.spec import SAESpec  # noqa: E402


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
