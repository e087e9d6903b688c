"""fastsae: end-to-end sparse autoencoders with fused Triton kernels."""

__version__ = "0.1.0"

from fastsae import ops  # noqa: E402
from fastsae.sae import E2ESAE, SAEOutput, SparseCode  # noqa: E402


def load_run(run_dir, *, device=None, dtype=None) -> dict:
    """{hook: E2ESAE}: the SAEs of a run's latest checkpoint (or of any path holding several SAEs:
    a checkpoint directory, a `fastsae export` output, a sparsify run, an e2e_sae checkpoint)."""
    from fastsae import formats

    return formats.load_all(run_dir, device=device, dtype=dtype)


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


__all__ = ["E2ESAE", "LanguageModel", "SAEOutput", "SparseCode", "TrainConfig", "Trainer", "load_config", "load_run",
           "ops", "__version__"]
