"""Checkpoints that survive a crash at any moment.

Layout of a run directory:

    RUN_DIR/config.yaml                  the resolved config (what --resume and eval read)
    RUN_DIR/metrics.jsonl                one JSON record per logged step / eval pass
    RUN_DIR/checkpoints/latest           name of the newest complete checkpoint (one line)
    RUN_DIR/checkpoints/step_00001234/
        saes/<hook name>/                each SAE, by E2ESAE.save_pretrained (cfg.json + safetensors)
        trainer_state.pt                 optimizer, scheduler, step, tokens, data position, RNGs, ...

A checkpoint is written into checkpoints/.tmp-step_.../ first, every file is fsynced, and only then
is the directory renamed to its final name (an atomic rename) and `latest` replaced atomically. A
crash or kill at any point leaves the previous checkpoint and `latest` as they were; the older
checkpoints are deleted only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastsae.sae import E2ESAE

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.pt"
SAE_DIR = "saes"
_TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def save_checkpoint(run_dir: str | os.PathLike, step: int, saes: dict[str, E2ESAE], state: dict,
                    keep: int = 1) -> Path:
    """Write checkpoint `step` (SAEs + trainer state) atomically; keep the newest `keep` ones."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:08d}"
    final = root / name
    # The same step saved again (a Ctrl-C or the end of fit() right after a periodic save, or a
    # resume interrupted before its first step) holds the same state: keep the complete copy on
    # disk rather than deleting it to write its twin, which a crash in between would lose.
    if not (final / STATE_FILE).is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
        try:
            for hook, sae in saes.items():
                sae.save_pretrained(tmp / SAE_DIR / hook)
            torch.save(state, tmp / STATE_FILE)
            _fsync_tree(tmp)
            if final.exists():  # an incomplete directory of that name: nothing there to keep
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_path(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _write_atomic(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP_PREFIX}{path.name}-")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def load_checkpoint(path: str | os.PathLike, *, device=None, dtype=None) -> tuple[dict[str, E2ESAE], dict]:
    """(SAEs by hook name, trainer state) from a checkpoint directory."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    saes = {sub.name: E2ESAE.from_pretrained(sub, device=device, dtype=dtype)
            for sub in sorted((path / SAE_DIR).iterdir()) if sub.is_dir()}
    # Our own file: it holds numpy / python RNG states, which weights_only would refuse.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return saes, state


def load_saes(run_dir: str | os.PathLike, *, device=None, dtype=None) -> dict[str, E2ESAE]:
    """The SAEs of a run's newest checkpoint, by hook name."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint under {CHECKPOINTS}/")
    return load_checkpoint(ckpt, device=device, dtype=dtype)[0]
