"""Makes the repository's top-level ``kernels/`` folder importable as ``fastsae.kernels``.

kernels/ (the Triton kernels, one op per file) sits beside the package in the source tree and is
installed as ``fastsae.kernels`` (pyproject's package-dir). It has no ``__init__.py`` on purpose:
a folder with one is a regular package, and ``python -m ...``, ``torchrun -m ...`` and pytest put the
repository root first on ``sys.path``, where a regular ``kernels`` package would shadow PyPI's
``kernels`` (Hugging Face's, which transformers imports for every model). Without it the folder
is at most a namespace portion, which any installed ``kernels`` package beats.

A wheel copies the folder to ``fastsae/kernels/``, where the import system finds it as a
namespace package. setuptools' editable finder maps ``fastsae.kernels`` to the folder but only
resolves mapped packages that have an ``__init__.py``; for an editable install (or a checkout on
``sys.path``) this module binds the package to the folder itself, as the finder would.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

NAME = "fastsae.kernels"


def _bind_checkout_kernels() -> None:
    if NAME in sys.modules or importlib.util.find_spec(NAME) is not None:
        return  # installed from a wheel (fastsae/kernels/), or bound already
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not folder.is_dir():
        raise ImportError(f"{NAME}: no kernels/ folder beside the fastsae package at {folder.parent} "
                          "(a broken install: reinstall fastsae)")
    spec = importlib.machinery.ModuleSpec(NAME, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Triton kernels, one op per file (forward and backward kernels and launchers together)."
    sys.modules[NAME] = module


_bind_checkout_kernels()
