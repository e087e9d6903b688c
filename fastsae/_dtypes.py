"""The floating-point dtypes fastsae stores SAEs and models in, by the names configs and files use.

One table and one parser for the config (model.dtype, saes.dtype), the trainer, the planner and
every SAE file format, so a dtype is spelled and checked the same way everywhere.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the name configs and cfg.json files use)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name, where: str) -> torch.dtype:
    """The torch dtype a file or config names ("float32" or "torch.float32"), or a ValueError that
    says where the name came from. float64 is accepted too (files written by other tools)."""
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{where}: unknown floating-point dtype {name!r}; expected one of "
                         f"{', '.join(DTYPE_NAMES)}")
    return value
