"""Checkpoints that survive a crash at any moment.

Layout of a run directory:

    RUN_DIR/config.yaml                  the resolved config the run started with (never rewritten)
    RUN_DIR/overrides.yaml               the --set overrides of each resume: [{step, time, overrides}]
                                         (--resume and eval read config.yaml + these, in order)
    RUN_DIR/metrics.jsonl                one JSON record per logged step / eval pass
    RUN_DIR/.lock                        flock-ed by the process training into it (its pid and host inside)
    RUN_DIR/checkpoints/latest           name of the newest complete checkpoint (one line)
    RUN_DIR/checkpoints/step_00001234/
        saes/<hook name>/                each SAE, by E2ESAE.save_pretrained (cfg.json + safetensors)
        trainer_state.pt                 optimizer, scheduler, step, tokens, data position, RNGs, ...

A checkpoint is written into checkpoints/.tmp-step_.../ first, every file is fsynced, and only then
is the directory renamed to its final name (an atomic rename) and `latest` replaced atomically. A
crash or kill at any point leaves the previous checkpoint and `latest` as they were; the older
checkpoints are deleted only after the new one is complete.

A run directory belongs to one run (claim_run_dir): a new run refuses a directory that holds a
checkpoint (resume it, or overwrite=True moves it aside to RUN_DIR.replaced-<time>). A directory
with a run that stopped before its first checkpoint (nothing to resume: killed, crashed, or failed)
is cleared and reused; a directory whose lock a live process holds (a run in progress) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastsae._files import atomic_write_text, fsync_path, honour_umask
# The layout's names and its reading side live in fastsae.runs, below the trainer, so that
# E2ESAE.from_pretrained and fastsae.load_run open run directories without importing it.
from fastsae.runs import CHECKPOINTS, LATEST, RUN_CONFIG, SAE_DIR, STATE_FILE, latest_checkpoint  # noqa: F401
from fastsae.sae import E2ESAE, load_run

CONFIG_FILE = RUN_CONFIG
OVERRIDES_FILE = "overrides.yaml"
LOCK_FILE = ".lock"
# What a run writes into its directory: cleared when a run that never checkpointed is started again.
RUN_FILES = (CONFIG_FILE, OVERRIDES_FILE, "metrics.jsonl", "eval.json", CHECKPOINTS, "wandb")
_TMP_PREFIX = ".tmp-"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def save_checkpoint(run_dir: str | os.PathLike, step: int, saes: dict[str, E2ESAE], state: dict,
                    keep: int = 1) -> Path:
    """Write checkpoint `step` (SAEs + trainer state) atomically; keep the newest `keep` ones."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a process killed mid-write
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    # The same step saved again (a Ctrl-C or the end of fit() right after a periodic save, or a
    # resume interrupted before its first step) holds the same state: keep the complete copy on
    # disk rather than deleting it to write its twin, which a crash in between would lose.
    if not (final / STATE_FILE).is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
        try:
            honour_umask(tmp, directory=True)  # mkdtemp makes 0700
            for hook, sae in saes.items():
                sae.save_pretrained(tmp / SAE_DIR / hook)
            torch.save(state, tmp / STATE_FILE)
            _fsync_tree(tmp)
            if final.exists():  # an incomplete directory of that name: nothing there to keep
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    atomic_write_text(root / LATEST, name + "\n", prefix=f"{_TMP_PREFIX}{LATEST}-")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, *, device=None, dtype=None) -> tuple[dict[str, E2ESAE], dict]:
    """(SAEs by hook name, trainer state) from a checkpoint directory."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    saes = load_run(path, device=device, dtype=dtype)
    # Our own file: it holds numpy / python RNG states, which weights_only would refuse.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return saes, state


# ---------------------------------------------------------------------- run directories


class RunDirError(RuntimeError):
    """A run directory cannot be used for this run; the message says why and what to do."""


# Locks this process holds, by run directory: the open file keeps the flock.
_HELD_LOCKS: dict[Path, object] = {}


def _read_lock(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _take_lock(run_dir: Path):
    """An open RUN_DIR/.lock holding an exclusive flock, or None when another process holds it.

    flock, not a pid check: the OS drops the lock when its process ends in any way (kill -9
    included), so a lock file left behind is never mistaken for a live run, and a reused pid is
    never mistaken for one either.
    """
    import fcntl

    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_run_dir(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool = False) -> str | None:
    """Make `run_dir` this process's run directory and lock it (until release_run_dir); returns a
    note for the console when something was cleared or moved aside, else None.

    resume: the trainer was restored from this directory's checkpoint, so its files are ours.
    Otherwise the directory must be new, or hold a run that stopped before its first checkpoint
    (cleared: there is nothing in it to resume), or overwrite=True (the old run is moved aside).
    Refused in every case while another process (or another trainer) holds the lock.
    """
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD_LOCKS:
        raise RunDirError(f"{run_dir} is in use by another trainer of this process (pid {os.getpid()}); "
                          "one run directory per run")
    run_dir.mkdir(parents=True, exist_ok=True)
    # A fastsae run leaves its lock file behind: without one, files named like a run's (a
    # config.yaml, a wandb/ folder) belong to the user and are never cleared or moved.
    made_by_fastsae = (run_dir / LOCK_FILE).is_file()
    holder = _read_lock(run_dir)
    handle = _take_lock(run_dir)
    if handle is None:
        raise RunDirError(f"{run_dir} is in use by another training process (pid {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')}); wait for it to finish or pick another run directory")
    note = None
    try:
        used = [name for name in RUN_FILES if (run_dir / name).exists()]
        if used and not resume:
            checkpoint = latest_checkpoint(run_dir)
            if not made_by_fastsae:
                raise RunDirError(f"{run_dir} holds {', '.join(used)} but is not a fastsae run directory (no "
                                  f"{LOCK_FILE}); pick a new or empty run directory")
            if overwrite:
                aside = run_dir.with_name(f"{run_dir.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
                handle.close()  # the lock file moves with the old run
                os.replace(run_dir, aside)
                run_dir.mkdir(parents=True)
                handle = _take_lock(run_dir)
                if handle is None:
                    raise RunDirError(f"{run_dir} was claimed by another process while the old run moved aside")
                note = f"moved the old run in {run_dir} aside to {aside}"
            elif checkpoint is not None:
                raise RunDirError(f"{run_dir} already holds a run (checkpoint {checkpoint.name}): resume it with "
                                  f"`fastsae train --resume {run_dir}`, pick another run directory, or pass "
                                  "--overwrite (Trainer(overwrite=True)) to move the old run aside")
            else:
                for name in used:
                    path = run_dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                note = f"{run_dir} held a run that stopped before its first checkpoint; starting it clean"
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n")
        handle.flush()
    except BaseException:
        if handle is not None:
            handle.close()
        raise
    _HELD_LOCKS[key] = handle
    return note


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Drop this process's lock on a run directory (the lock file stays; it is free once unlocked)."""
    handle = _HELD_LOCKS.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()


def record_overrides(run_dir: str | os.PathLike, overrides: list[str], step: int) -> None:
    """Append one resume's --set overrides to RUN_DIR/overrides.yaml (config.yaml stays as the run
    started)."""
    import yaml

    if not overrides:
        return
    path = Path(run_dir) / OVERRIDES_FILE
    records = read_overrides(run_dir, raw=True)
    records.append({"step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "overrides": list(overrides)})
    atomic_write_text(path, yaml.safe_dump(records, sort_keys=False))


def read_overrides(run_dir: str | os.PathLike, *, raw: bool = False) -> list:
    """The overrides recorded by earlier resumes, flattened in order (raw: the records)."""
    import yaml

    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return []
    records = yaml.safe_load(path.read_text()) or []
    if raw:
        return records
    return [item for record in records for item in record["overrides"]]


def load_run_config(run_dir: str | os.PathLike, overrides: list[str] | None = None):
    """A run's config: config.yaml, then the overrides of its earlier resumes, then `overrides`."""
    from fastsae.train.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return load_config(run_dir / CONFIG_FILE, [*read_overrides(run_dir), *(overrides or [])])
