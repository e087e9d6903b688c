"""MkDocs hook: the figures under benchmarks/results/ in the site.

Pages link a figure where it lives in the repository (``../benchmarks/results/NAME.png`` from
docs/), so the Markdown shows it on GitHub too. The site cannot serve files outside docs/: this
hook adds every PNG and SVG of benchmarks/results/ to the site under ``results/`` and points the
pages' links there. A link that does not climb exactly to the repository root is left as it is,
and `mkdocs build --strict` then fails on it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = (".png", ".svg")
LINK = re.compile(r"\]\((?P<up>(?:\.\./)+)benchmarks/results/(?P<path>[^)\s]+)\)")


def on_files(files, config):
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix in FIGURES:
            uri = f"results/{path.relative_to(RESULTS).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # folders between docs/ and the page

    def site_link(match):
        if len(match["up"]) // 3 != depth + 1:
            return match[0]
        return f"]({'../' * depth}results/{match['path']})"

    return LINK.sub(site_link, markdown)
