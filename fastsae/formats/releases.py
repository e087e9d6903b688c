"""Released SAEs by name: SAELens's registry and fastsae's own, and one resolver for their files.

    sae = E2ESAE.from_pretrained("gpt2-small-res_sce-ajt", sae_id="blocks.6.hook_resid_pre")
    sae = E2ESAE.from_pretrained("gpt2-small-res_sce-ajt:blocks.6.hook_resid_pre")   # the same, one string
    fastsae eval --sae gpt2-small-res_sce-ajt:blocks.6.hook_resid_pre --config gpt2-e2e
    fastsae releases [RELEASE] [--model gpt2-small]                                   # what the registry holds

The registry is SAELens's `pretrained_saes.yaml` schema, read as it is: per release `repo_id` (a
Hugging Face repository), `model`, `conversion_func` (null: SAELens's own files), optional
`config_overrides` and `links`, and `saes`, a list of {id, path, l0, variance_explained,
neuronpedia, ...} (path: the SAE's folder, or file, inside the repository). Sources, a later one
replacing a release of the same name:
    1. fastsae/formats/releases.yaml, fastsae's own (releases SAELens lacks, and the e2e paper's SAEs,
       because sae-lens pins transformer-lens < 4 and so is absent where fastsae runs on 4.x);
    2. SAELens's pretrained_saes.yaml where sae-lens is installed (found without importing it);
    3. the files named by FASTSAE_RELEASES (os.pathsep-separated): one's own releases.
fastsae adds one optional release key SAELens's reader ignores: `revision` (a commit, branch or tag
the files are read at; `revision=` of from_pretrained wins).

Each release's conversion_func picks a converter (CONVERTERS): null / "sae_lens" -> SAELens
directories (fastsae.formats.saelens), "sparsify", "fastsae" and "e2e_sae" (the paper's .pt
files, with final_config.yaml beside them when the repository has one). Releases whose
conversion_func fastsae has no converter for (Gemma Scope's npz files, Llama Scope, ...) are listed
but refused on load, naming the function.

Files come through resolve_file, the one function that touches the hub (tests replace it): the
Hugging Face cache first (huggingface_hub.hf_hub_download with local_files_only, which honours
HF_HOME / HF_HUB_CACHE), then, when the hub can be asked (no HF_HUB_OFFLINE, huggingface.co
reachable), a download into that cache. A file neither cached nor downloadable is one line
(ReleaseNotCachedError) instead of the hub client's retries.
"""

from __future__ import annotations

import difflib
import os
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from fastsae._hub import hub_unavailable_reason
from fastsae.formats import e2e_sae, native, saelens, sparsify
from fastsae.formats.hooks import hook_aliases
from fastsae.formats.record import SAERecord

OWN_REGISTRY = Path(__file__).with_name("releases.yaml")
SAELENS_REGISTRY_NAME = "pretrained_saes.yaml"
REGISTRY_VARIABLE = "FASTSAE_RELEASES"
_HOOK_NAME = re.compile(r"^(blocks\.\d+\.hook_\w+|hook_embed)$")


class ReleaseNotCachedError(FileNotFoundError):
    """A release's file is not in the Hugging Face cache, and the hub cannot be asked now."""


@dataclass(frozen=True)
class ReleaseSAE:
    """One SAE of a release: its id, its folder (or file) inside the repository, and what the
    registry says about it (l0, variance_explained, neuronpedia id; None where it says nothing)."""

    id: str
    path: str
    l0: float | None = None
    variance_explained: float | None = None
    neuronpedia: str | None = None


@dataclass(frozen=True)
class Release:
    """A release: a repository of SAEs for one model, and the converter its files need.

    source: where the entry was read ("fastsae", "sae-lens VERSION", or a FASTSAE_RELEASES file)."""

    name: str
    repo_id: str
    model: str
    conversion_func: str | None
    saes: dict[str, ReleaseSAE]
    source: str
    revision: str | None = None
    config_overrides: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)

    @property
    def converter(self) -> "Converter | None":
        """The converter of this release's files; None where fastsae has none."""
        return CONVERTERS.get(self.conversion_func or "sae_lens")


# ------------------------------------------------------------------------------------------------
# converters: which files of the repository one SAE needs, and how to read them

@dataclass(frozen=True)
class Converter:
    """format: fastsae's name for the file format. files(path) -> (required, optional) repository
    files of the SAE at ``path``. read(local, sae, hook) -> the record, from {repository file:
    local path} (``hook`` picks one SAE where a file holds several)."""

    format: str
    files: Callable[[str], tuple[list[str], list[str]]]
    read: Callable[[dict, ReleaseSAE, str | None], SAERecord]


def _directory_files(weights_name: str):
    def files(path: str) -> tuple[list[str], list[str]]:
        return [posixpath.join(path, native.CONFIG_NAME), posixpath.join(path, weights_name)], []
    return files


def _one_directory(local: dict) -> Path:
    """The directory holding every file of a directory format (the hub cache keeps a repository's
    folders, so one SAE's files share one)."""
    parents = {Path(path).parent for path in local.values()}
    if len(parents) != 1:
        raise ValueError(f"the resolver put one SAE's files in different directories: {sorted(map(str, parents))}")
    return parents.pop()


def _directory_reader(read: Callable[[Path], SAERecord]):
    return lambda local, sae, hook: read(_one_directory(local))


def _read_e2e_sae(local: dict, sae: ReleaseSAE, hook: str | None) -> SAERecord:
    checkpoint = Path(local[sae.path])
    entries = e2e_sae.entries(checkpoint)
    wanted = hook or (sae.id if _HOOK_NAME.match(sae.id) else None)
    if len(entries) > 1:
        matches = [entry for entry in entries if wanted in entry[1]]
        if not matches:
            raise ValueError(f"{checkpoint} holds SAEs for {[entry[0] for entry in entries]}; the SAE id "
                             f"{sae.id!r} names none of them (pass hook=...)")
        entries = matches
    return entries[0][2]()


CONVERTERS = {
    "sae_lens": Converter("saelens", _directory_files(saelens.WEIGHTS_NAME), _directory_reader(saelens.read)),
    "sparsify": Converter("sparsify", _directory_files(sparsify.WEIGHTS_NAME), _directory_reader(sparsify.read)),
    "fastsae": Converter("fastsae", _directory_files(native.WEIGHTS_NAME), _directory_reader(native.read)),
    "e2e_sae": Converter("e2e_sae", lambda path: ([path], [posixpath.join(posixpath.dirname(path),
                                                                          e2e_sae.CONFIG_NAME)]), _read_e2e_sae),
}


# ------------------------------------------------------------------------------------------------
# the registry

def saelens_registry() -> tuple[str, Path] | None:
    """("sae-lens VERSION", path of its pretrained_saes.yaml) where sae-lens is installed; found
    without importing it (which would import transformer-lens)."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("sae_lens")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SAELENS_REGISTRY_NAME
    if not path.is_file():
        return None
    try:
        version = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return f"sae-lens {version}", path


def registry_sources() -> list[tuple[str, Path]]:
    """(source name, YAML file) of every registry, lowest precedence first (module docstring)."""
    sources = [("fastsae", OWN_REGISTRY)]
    found = saelens_registry()
    if found is not None:
        sources.append(found)
    for entry in os.environ.get(REGISTRY_VARIABLE, "").split(os.pathsep):
        if entry.strip():
            path = Path(entry.strip()).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{REGISTRY_VARIABLE} names {path}, which is not a file")
            sources.append((str(path), path))
    return sources


def _optional_number(value, where: str, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def parse_release(name: str, entry, source: str) -> Release:
    """A release from its YAML entry, checked: a bad field is an error naming the release and field."""
    where = f"release {name!r} ({source})"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping with repo_id, model and saes, got {type(entry).__name__}")
    for key in ("repo_id", "model"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {entry.get(key)!r}")
    conversion = entry.get("conversion_func")
    if conversion is not None and not isinstance(conversion, str):
        raise ValueError(f"{where}: conversion_func must be a string or null, got {conversion!r}")
    if not isinstance(entry.get("saes"), list) or not entry["saes"]:
        raise ValueError(f"{where}: saes must be a non-empty list of {{id, path, ...}}")
    saes = {}
    for item in entry["saes"]:
        if not isinstance(item, dict) or "id" not in item or "path" not in item:
            raise ValueError(f"{where}: every entry of saes needs an id and a path, got {item!r}")
        sae_id = str(item["id"])  # SAELens reads ids and paths as strings too
        neuronpedia = item.get("neuronpedia")
        saes[sae_id] = ReleaseSAE(sae_id, str(item["path"]), _optional_number(item.get("l0"), where, "l0"),
                                  _optional_number(item.get("variance_explained"), where, "variance_explained"),
                                  None if neuronpedia is None else str(neuronpedia))
    revision = entry.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise ValueError(f"{where}: revision must be a string (a commit, branch or tag), got {revision!r}")
    return Release(name, entry["repo_id"], entry["model"], conversion, saes, source, revision,
                   dict(entry.get("config_overrides") or {}), dict(entry.get("links") or {}))


@lru_cache(maxsize=16)
def _read_registry_file(path: str, modified: int, source: str) -> dict[str, Release]:
    import yaml

    with open(path) as file:  # the C loader reads SAELens's 40,000 lines several times faster
        data = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a release registry is a mapping of release names to entries")
    return {str(name): parse_release(str(name), entry, source) for name, entry in data.items()}


def load_registry(sources: list[tuple[str, Path]] | None = None) -> dict[str, Release]:
    """Every release by name, from ``sources`` (default: registry_sources()); later ones win."""
    releases: dict[str, Release] = {}
    for source, path in registry_sources() if sources is None else sources:
        releases.update(_read_registry_file(str(path), Path(path).stat().st_mtime_ns, source))
    return releases


def get_release(name: str, registry: dict[str, Release] | None = None) -> Release:
    registry = load_registry() if registry is None else registry
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"no release named {name!r} in the registry ({len(registry)} releases; "
                         f"`fastsae releases` lists them){hint}")
    return registry[name]


def split_release_name(spec: str, registry: dict[str, Release] | None = None) -> tuple[str, str] | None:
    """("RELEASE", "ID") for "RELEASE:ID" when no file or directory is called ``spec`` and the text
    before the first ":" names a release (SAELens's release names and ids hold no ":"); else None."""
    if not isinstance(spec, str) or ":" not in spec or Path(spec).exists():
        return None
    release, sae_id = spec.split(":", 1)
    registry = load_registry() if registry is None else registry
    return (release, sae_id) if release in registry and sae_id else None


# ------------------------------------------------------------------------------------------------
# files

def resolve_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """The local path of ``filename`` in the Hugging Face repository ``repo_id`` at ``revision``
    (None: its default branch): from the Hugging Face cache, else downloaded into it when the hub
    can be asked. ReleaseNotCachedError (one line) when neither; FileNotFoundError when the
    repository has no such file. The one function here that touches the hub: tests replace it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except EntryNotFoundError:  # the cache remembers that the repository lacks the file
        raise FileNotFoundError(f"{repo_id} has no file {filename}") from None
    at = f" at revision {revision}" if revision else ""
    reason = hub_unavailable_reason()
    if reason is not None:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ReleaseNotCachedError(f"{repo_id}/{filename}{at} is not in the Hugging Face cache ({HF_HUB_CACHE}) "
                                    f"and {reason}")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except EntryNotFoundError:
        raise FileNotFoundError(f"{repo_id} has no file {filename}{at}") from None


def _resolve_all(release: Release, required: list[str], optional: list[str], revision: str | None) -> dict:
    local = {name: resolve_file(release.repo_id, name, revision) for name in required}
    for name in optional:  # e.g. e2e_sae's final_config.yaml, which names the model
        try:
            local[name] = resolve_file(release.repo_id, name, revision)
        except FileNotFoundError:  # absent, or not cached offline: the registry names the model too
            pass
    return local


def load_release(release: str, sae_id: str, *, hook: str | None = None, revision: str | None = None,
                 registry: dict[str, Release] | None = None) -> SAERecord:
    """The SAE ``sae_id`` of ``release`` as a record (see the module docstring). ``hook``: the hook
    the SAE must read (picks one where a file holds several); ``revision`` overrides the release's."""
    entry = get_release(release, registry)
    if sae_id not in entry.saes:
        ids = list(entry.saes)
        close = difflib.get_close_matches(sae_id, ids, n=3)
        shown = ", ".join(close) if close else ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
        raise ValueError(f"release {release!r} has no SAE {sae_id!r}; it has {len(ids)} "
                         f"({'closest: ' if close else ''}{shown}; `fastsae releases {release}` lists them)")
    sae = entry.saes[sae_id]
    converter = entry.converter
    if converter is None:
        raise ValueError(f"release {release!r} needs SAELens's conversion_func {entry.conversion_func!r}, which "
                         f"fastsae has no converter for; it converts {sorted(CONVERTERS)} (conversion_func null: "
                         "SAELens's own files)")
    revision = revision or entry.revision
    required, optional = converter.files(sae.path)
    try:
        local = _resolve_all(entry, required, optional, revision)
    except ReleaseNotCachedError as error:
        raise ReleaseNotCachedError(f"release {release!r}, SAE {sae_id!r}: {error}") from None
    record = converter.read(local, sae, hook)
    metadata = record.metadata
    if "hook" not in metadata and _HOOK_NAME.match(sae.id):  # files that do not name their hook
        metadata["hook"] = sae.id
    if hook is not None and metadata.get("hook") not in (None, *hook_aliases(hook)):
        raise ValueError(f"release {release!r}, SAE {sae_id!r} reads {metadata['hook']!r}, not hook {hook!r}")
    if hook is not None:
        metadata.setdefault("hook", hook)
    metadata.setdefault("model", entry.model)
    metadata["release"] = {"release": release, "sae_id": sae_id, "repo_id": entry.repo_id, "path": sae.path,
                           "revision": revision, "registry": entry.source, "neuronpedia": sae.neuronpedia,
                           "local": str(local[required[0]])}  # where its first file was read from
    model_kwargs = entry.config_overrides.get("model_from_pretrained_kwargs")
    if model_kwargs:
        warnings.warn(f"release {release!r} was trained on {entry.model} loaded with {model_kwargs}; fastsae runs "
                      "models unprocessed, so the residual stream it splices into differs from the one this SAE "
                      "read", stacklevel=2)
    return record


# ------------------------------------------------------------------------------------------------
# listing

def _model_matches(release: Release, model: str) -> bool:
    wanted = model.lower()
    names = {release.model.lower(), release.model.lower().rsplit("/", 1)[-1]}
    return wanted in names or wanted.rsplit("/", 1)[-1] in names


def describe_releases(model: str | None = None, registry: dict[str, Release] | None = None) -> str:
    """The table `fastsae releases [--model M]` prints: release, model, converter, SAEs, repository,
    registry; a last line on SAELens's registry when it is not installed."""
    registry = load_registry() if registry is None else registry
    shown = [r for r in registry.values() if model is None or _model_matches(r, model)]
    rows = [("release", "model", "converter", "SAEs", "repository", "registry")]
    for r in sorted(shown, key=lambda r: (r.model.lower(), r.name)):
        converter = r.converter.format if r.converter else f"none ({r.conversion_func})"
        rows.append((r.name, r.model, converter, str(len(r.saes)), r.repo_id, r.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if len(rows) == 1:
        lines = [f"no release {'for model ' + repr(model) + ' ' if model else ''}in the registry"]
    if saelens_registry() is None:
        lines.append("(SAELens's registry is not here: `pip install sae-lens` adds its releases; it needs "
                     "transformer-lens < 4)")
    return "\n".join(lines)


def describe_release(name: str, registry: dict[str, Release] | None = None) -> str:
    """`fastsae releases RELEASE`: the release's facts and one line per SAE (id, path, l0, neuronpedia)."""
    r = get_release(name, registry)
    converter = r.converter.format if r.converter else f"none: fastsae cannot convert {r.conversion_func!r}"
    lines = [f"{r.name}: {len(r.saes)} SAE(s) of {r.model} in {r.repo_id}"
             + (f" at {r.revision}" if r.revision else ""), f"converter: {converter}; registry: {r.source}"]
    lines += [f"{key}: {value}" for key, value in r.links.items()]
    rows = [("id", "path", "l0", "neuronpedia")]
    for sae in r.saes.values():
        rows.append((sae.id, sae.path, "" if sae.l0 is None else f"{sae.l0:g}", sae.neuronpedia or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"load one: E2ESAE.from_pretrained({r.name!r}, sae_id=ID) or fastsae eval --sae {r.name}:ID")
    return "\n".join(lines)
