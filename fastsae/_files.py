"""Atomic file writes, and file modes for them (SAE files, checkpoints, metrics, the embedded model cache).

tempfile.mkstemp / mkdtemp create files 0600 and directories 0700, private to the user, whatever
the umask; renamed into place they would make a run's SAEs and metrics unreadable to the group that
shares a machine or a results directory. honour_umask gives them the mode a plain open() / mkdir()
gives: 0666 / 0777 minus the process umask.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status);
    elsewhere by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, *, directory: bool = False) -> None:
    """chmod a file (or directory) made by mkstemp (mkdtemp) to 0666 (0777) & ~umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write, *, prefix: str | None = None) -> Path:
    """write(tmp_path) to a temporary file beside ``path``, then rename it over ``path``.

    A crash midway leaves the old file (or none) in place, never a half-written one. The file gets
    the mode a plain open() would give (honour_umask), is fsynced before the rename, and the
    directory entry after it. ``prefix`` names the temporary file (default ".<name>.") so a caller
    can find and clear ones a killed process left.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        honour_umask(tmp)  # after the write: a writer may replace the file
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, prefix: str | None = None) -> Path:
    """atomic_write of a text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), prefix=prefix)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object (a cfg.json, an eval.json), or a ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_files(directory: str | os.PathLike, names, what: str) -> list[Path]:
    """directory / name for each name, or a FileNotFoundError naming the first missing one and
    what the directory should have been (e.g. "not a saved E2ESAE")."""
    paths = [Path(directory) / name for name in names]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {path.name}: {what}")
    return paths


def load_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file, or a ValueError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is corrupt or not a safetensors file ({error})") from None


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (made contiguous) to a safetensors file atomically."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
