"""SAE files in and out: fastsae's own, SAELens, sparsify and the paper's e2e_sae checkpoints.

Every format is a module here with its conversion formulas in its docstring, and one table,
FORMATS, says how to recognise, read and write each. They read into and write from SAERecord
(fastsae.formats.record), which E2ESAE.from_record / to_record turn into a module and back:

    E2ESAE.from_pretrained(path, hook=None)   every format below, detected from the files
    E2ESAE.save_pretrained(path, format=...)  fastsae, SAELens and sparsify directories
    fastsae export RUN_DIR --format ...       the latest SAEs of a run, converted

Every conversion gives the same reconstruction (to float rounding) and the same code (values,
TopK selection, thresholds); what a format cannot express is refused with an error naming it.
Transcoders (d_out, a skip path W_skip, metadata hook "IN->OUT") go through fastsae's, SAELens's
and sparsify's files as well (each module's docstring says how); e2e_sae has none.
Besides single SAE directories, a path may be a fastsae run (its latest checkpoint), a checkpoint
directory, a directory of SAE directories (`fastsae export` output, a sparsify run), or an e2e_sae
run directory or `samples_<N>.pt` file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastsae import runs
from fastsae._files import read_json_object
from fastsae.formats import e2e_sae, native, saelens, sparsify
from fastsae.formats.hooks import hook_aliases, hook_from_sparsify, sparsify_hookpoint
from fastsae.formats.record import SAERecord


@dataclass(frozen=True)
class Format:
    """How to recognise (detect(path, cfg.json) for a directory with cfg.json), read, and write a
    single-SAE directory of one format, and which hook its files name (None: they name none)."""

    detect: Callable[[Path, dict], bool]
    read: Callable[[Path], SAERecord]
    write: Callable[[SAERecord, Path], Path]
    read_hook: Callable[[Path], str | None]


# Detection tries these in order: cfg.json decides first (a directory saved again in another
# format may keep the old format's weights file beside the new one).
FORMATS = {
    "fastsae": Format(native.detect, native.read, native.write, native.read_hook),
    "sparsify": Format(sparsify.detect, sparsify.read, sparsify.write, sparsify.read_hook),
    "saelens": Format(saelens.detect, saelens.read, saelens.write, saelens.read_hook),
}
CONFIG_NAME = native.CONFIG_NAME

__all__ = ["FORMATS", "SAERecord", "detect_format", "export", "hook_from_sparsify", "load", "load_all", "save",
           "sparsify_hookpoint", "split_hook"]



def split_hook(spec: str) -> tuple[str, str | None]:
    """PATH[@HOOK], as the commands take an SAE: (path, hook or None). The hook follows the last
    "@", unless the whole spec is an existing path (a file name may hold an "@")."""
    if "@" in spec and not Path(spec).exists():
        path, hook = spec.rsplit("@", 1)
        return path, hook or None
    return spec, None

def one_model(named, given: str | None = None) -> str:
    """The model a group of SAEs reads: ``given`` (a command's --model) where set, else the one
    model they name (metadata["model"], SAELens's model_name, a run's model.name; None entries are
    ignored). A ValueError says what to give where they name none or several."""
    if given:
        return given
    names = sorted({str(name) for name in named if name})
    if len(names) != 1:
        raise ValueError("give --model NAME_OR_DIR: the SAEs " + (f"name several models ({', '.join(names)})" if names
                                                                 else "do not name their model"))
    return names[0]


def detect_format(path: str | os.PathLike) -> str:
    """The format of an SAE file or directory: one of FORMATS, "e2e_sae", "fastsae-run" (a run
    directory), "fastsae-checkpoint" (checkpoints/step_N) or "collection" (a directory of SAE
    directories, as `fastsae export` and sparsify runs write)."""
    path = Path(path)
    if path.is_file():
        if e2e_sae.detect(path):
            return "e2e_sae"
        raise ValueError(f"{path} is a file but not an e2e_sae checkpoint (.pt); SAE formats are directories "
                         f"(fastsae, SAELens, sparsify) or e2e_sae .pt files")
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE directory or file at {path}")
    if (path / CONFIG_NAME).is_file():
        config = read_json_object(path / CONFIG_NAME)
        for name, format in FORMATS.items():
            if format.detect(path, config):
                return name
        raise FileNotFoundError(f"{path} has {CONFIG_NAME} but neither {saelens.WEIGHTS_NAME} (SAELens) "
                                f"nor {sparsify.WEIGHTS_NAME} (sparsify)")
    if runs.is_run_dir(path):
        return "fastsae-run"
    if runs.is_checkpoint(path):
        return "fastsae-checkpoint"
    if e2e_sae.detect(path):
        return "e2e_sae"
    if any((sub / CONFIG_NAME).is_file() for sub in path.iterdir() if sub.is_dir()):
        return "collection"
    raise FileNotFoundError(
        f"{path} has no {CONFIG_NAME} and holds no SAE: expected {CONFIG_NAME} with {saelens.WEIGHTS_NAME} "
        f"(fastsae, SAELens) or {sparsify.WEIGHTS_NAME} (sparsify), a run directory ({runs.CHECKPOINTS}/), a "
        f"checkpoint ({runs.SAE_DIR}/), e2e_sae samples_<N>.pt files, or subdirectories holding SAEs")


@dataclass
class _Entry:
    """One SAE in a file or directory: its hook (None if the file does not say), the names it
    answers to, and its reader (called only for the SAE asked for)."""

    hook: str | None
    names: set[str]
    read: Callable[[], SAERecord]


def _entries(path: Path) -> list[_Entry]:
    kind = detect_format(path)
    if kind in FORMATS:
        return [_single_entry(path, kind)]
    if kind == "e2e_sae":
        return [_Entry(hook, names, read) for hook, names, read in e2e_sae.entries(path)]
    if kind != "collection":
        path = runs.checkpoint_saes(path)
    entries = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
        entry = _single_entry(sub, detect_format(sub))
        if entry.hook is None:  # sparsify's directory name is its hookpoint; ours the hook name
            entry.hook = hook_from_sparsify(sub.name) or sub.name
        entry.names |= hook_aliases(entry.hook) | {sub.name}
        entries.append(entry)
    return entries


def _single_entry(path: Path, kind: str) -> _Entry:
    format = FORMATS[kind]
    hook = format.read_hook(path)
    return _Entry(hook, hook_aliases(hook) if hook else set(), lambda: format.read(path))


def _select(path: Path, entries: list[_Entry], hook: str | None) -> _Entry:
    if not entries:
        raise FileNotFoundError(f"{path} holds no SAE")
    hooks = [entry.hook for entry in entries]
    if hook is None:
        if len(entries) > 1:
            raise ValueError(f"{path} holds {len(entries)} SAEs; choose one with hook=, one of {hooks}")
        return entries[0]
    matches = [entry for entry in entries if hook in entry.names]
    if not matches and len(entries) == 1 and entries[0].hook is None:
        return entries[0]  # the file does not name its hook: take the caller's word for it
    if not matches:
        raise ValueError(f"{path} has no SAE for hook {hook!r}; it holds SAEs for {hooks}")
    return matches[0]


def load(path: str | os.PathLike, hook: str | None = None) -> SAERecord:
    """The SAE at ``path`` (any format above); ``hook`` picks one where the path holds several."""
    path = Path(path)
    entry = _select(path, _entries(path), hook)
    record = entry.read()
    name = entry.hook if entry.hook is not None else hook  # the file's name for it (a transcoder's "IN->OUT")
    if name is not None and "hook" not in record.metadata:
        record.metadata["hook"] = name
    return record


def load_all(path: str | os.PathLike) -> dict[str, SAERecord]:
    """Every SAE at ``path``, by hook name (a run: the SAEs of its latest checkpoint)."""
    path = Path(path)
    records = {}
    for entry in _entries(path):
        if entry.hook is None:
            raise ValueError(f"{path} does not say which hook its SAE reads; load it with "
                             "E2ESAE.from_pretrained(path, hook=...)")
        records[entry.hook] = record = entry.read()
        record.metadata.setdefault("hook", entry.hook)
    return records


def save(record: SAERecord, directory: str | os.PathLike, format: str = "fastsae") -> Path:
    """Write an SAE record to ``directory`` in ``format`` (one of FORMATS)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {format!r}")
    return FORMATS[format].write(record, Path(directory))


def export(path: str | os.PathLike | None, format: str, out: str | os.PathLike, *, layers_name: str = "layers",
           records: dict[str, SAERecord] | None = None) -> dict[str, Path]:
    """Write every SAE at ``path`` (a run: its latest checkpoint), or the given {hook: record}, to
    ``out``, one subdirectory per hook: named by the hook for fastsae / SAELens, by the hookpoint
    for sparsify (so that sparsify's SparseCoder.load_many(out, local=True) reads it). Returns
    {hook: directory}."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {format!r}")
    records = load_all(path) if records is None else records
    names = {hook: sparsify_hookpoint(hook, layers_name) if format == "sparsify" else hook for hook in records}
    for name in set(names.values()):
        clash = sorted(hook for hook in names if names[hook] == name)
        if len(clash) > 1:  # e.g. an SAE on blocks.L.hook_mlp_out and the transcoder of that MLP: both layers.L.mlp
            raise ValueError(f"the SAEs for {clash} would all be written to {name!r}; export them separately")
    out = Path(out)
    return {hook: save(record, out / names[hook], format) for hook, record in records.items()}
