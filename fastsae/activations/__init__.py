"""The SAE activations, one module each in this package, found by name.

    from fastsae.activations import get_activation
    TopK = get_activation("topk")          # the class; TopK(TopK.make_params({"k": 32})) an instance

Every module here that defines an Activation subclass adds it to the registry: a new kind is one
new file (its hyperparameters, extra tensors, training pass and loss terms, memory and file
mappings; see base.py), and E2ESAE, the config, the trainer, the formats, the sharded SAE and the
planner read it from here. The modules beside the kinds: base.py (the base class), code.py (what a
training pass returns), paths.py (the fused paths and the chunked dense reference a kind calls),
auxk.py (AuxK, for the kinds that use it).
"""

from __future__ import annotations

import importlib
import pkgutil

from fastsae.activations.base import Activation, ExtraTensor, NoParams
from fastsae.activations.code import ActivationMemory, LossTerm, SAEForward, SparseCode, TrainingSettings


def _discover() -> dict[str, type[Activation]]:
    found = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
        namespace = importlib.import_module(f"{__name__}.{module}")
        for value in vars(namespace).values():
            if isinstance(value, type) and issubclass(value, Activation) and value.__module__ == namespace.__name__:
                if value.name in found:
                    raise RuntimeError(f"two activations are named {value.name!r}: {found[value.name]} and {value}")
                found[value.name] = value
    return found


ACTIVATIONS: dict[str, type[Activation]] = _discover()
ACTIVATION_NAMES = tuple(sorted(ACTIVATIONS))


def get_activation(name: str) -> type[Activation]:
    """The Activation class registered as `name`, or a ValueError listing the names."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {ACTIVATION_NAMES}, got {name!r}") from None


__all__ = ["ACTIVATIONS", "ACTIVATION_NAMES", "Activation", "ActivationMemory", "ExtraTensor", "LossTerm", "NoParams",
           "SAEForward", "SparseCode", "TrainingSettings", "get_activation"]
