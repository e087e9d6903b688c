"""Writing a dashboard's static site: the page, and its data split into small script files.

    DIR/index.html, dashboard.js, dashboard.css    the page (fastsae/dashboard/static/, hand-written)
    DIR/data/meta.js                               what the dashboard shows: model, tokens, SAEs, notes
    DIR/data/vocab.js                              every token id's exact text
    DIR/data/<sae>/index.js                        per latent: firing count, max, mean, top tokens
    DIR/data/<sae>/latents/NNNNN.js                SHARD latents per file: contexts, histogram, logits, neighbours
    DIR/data/<sae>/tokens/NNNNN.js                 per token id: the latents that fire most on it
    DIR/dashboard.json                             the build's record (settings, timings, peak memory)
    DIR/latent_stats/<sae>/                        fastsae.analysis.LatentStats of the same pass

Every data file is a script calling ``fastsaeDashboard.register(kind, name, data)`` with a JSON
literal (ASCII only, so any byte of a token's text is an escape): a page opened from disk may load
scripts but not fetch() files, so this works from file:// and from any static server alike.

The site is written into a staging directory beside DIR and moved into place at the end: a failed
build leaves DIR as it was. A DIR that holds something other than a dashboard is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from fastsae._files import honour_umask

STATIC_FILES = ("index.html", "dashboard.js", "dashboard.css")
RECORD_NAME = "dashboard.json"
FORMAT = "fastsae.dashboard"
VERSION = 1


class SiteError(ValueError):
    """The output directory cannot take a dashboard (the message says why)."""


def rounded(x: float, digits: int = 4) -> float | None:
    """x to ``digits`` significant digits (smaller files; the page shows 3 or 4); None if not finite."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}") if x else 0.0


def rounded_list(values, digits: int = 4) -> list:
    return [rounded(v, digits) for v in values]


def script(kind: str, name: str, data) -> str:
    """A data file's text: one register call with ``data`` as a JSON literal."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return f"fastsaeDashboard.register({json.dumps(kind)},{json.dumps(name)},{payload});\n"


def check_out_dir(out: Path) -> None:
    """Refuse an output directory that holds anything but a previous dashboard."""
    if out.exists() and not out.is_dir():
        raise SiteError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_NAME).is_file():
        raise SiteError(f"--out {out} is not empty and holds no dashboard ({RECORD_NAME}); "
                        "give a new or empty directory (a previous dashboard there is replaced)")


class SiteWriter:
    """Collects a site's files in a staging directory; ``commit()`` moves it to ``out``.

        with SiteWriter(out) as site:
            site.write_data("meta", "", "meta.js", {...})
            site.commit()
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        check_out_dir(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.dashboard-", dir=self.out.parent))
        self.bytes_written = 0
        self.files_written = 0

    def __enter__(self) -> "SiteWriter":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    @property
    def root(self) -> Path:
        return self.stage

    def write_text(self, relative: str, text: str) -> Path:
        path = self.stage / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.bytes_written += len(text.encode("utf-8"))
        self.files_written += 1
        return path

    def write_data(self, kind: str, name: str, relative: str, data) -> Path:
        return self.write_text(f"data/{relative}", script(kind, name, data))

    def copy_static(self) -> None:
        static = resources.files("fastsae.dashboard") / "static"
        for name in STATIC_FILES:
            self.write_text(name, (static / name).read_text(encoding="utf-8"))

    def commit(self) -> Path:
        """Move the staged site to ``out`` (a previous dashboard there is replaced whole)."""
        check_out_dir(self.out)
        for path in [self.stage, *self.stage.rglob("*")]:
            honour_umask(path, directory=path.is_dir())
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "site")
        os.replace(self.stage, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out / "index.html"
