"""The layout of a run directory, and where its latest SAEs are (the reading side).

    RUN_DIR/config.yaml                   the resolved config the run started with
    RUN_DIR/checkpoints/latest            name of the newest complete checkpoint (one line)
    RUN_DIR/checkpoints/step_00001234/    saes/<hook>/ (one SAE directory each) + trainer_state.pt

fastsae.train.checkpoint writes this layout (and documents the rest of the run directory); the
formats read it from here, so E2ESAE.from_pretrained and fastsae.load_run open runs without the
trainer.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
SAE_DIR = "saes"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run: the one `latest` names, else the newest step_*
    directory holding a trainer state (in case `latest` itself was lost), else None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def is_run_dir(path: Path) -> bool:
    return (path / CHECKPOINTS).is_dir() or (path / RUN_CONFIG).is_file()


def is_checkpoint(path: Path) -> bool:
    return (path / SAE_DIR).is_dir()


def checkpoint_saes(path: Path) -> Path:
    """The directory of SAE directories of a run (its latest checkpoint) or of a checkpoint."""
    if is_run_dir(path):
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint under {CHECKPOINTS}/")
        path = checkpoint
    return path / SAE_DIR
