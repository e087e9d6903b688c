"""The measured tables of the README and the docs pages are what benchmarks/readme_tables.py writes
from the committed records: a table edited by hand, or a record replaced without regenerating,
fails here."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_tables)


@pytest.mark.parametrize("relative", readme_tables.FILES)
def test_generated_tables_equal_their_records(relative):
    text = (ROOT / relative).read_text()
    assert text == readme_tables.render(text, relative), (
        f"{relative}'s tables differ from their records: run python benchmarks/readme_tables.py")


def test_every_table_is_used_and_names_its_record():
    used = {match["name"] for relative in readme_tables.FILES
            for match in readme_tables.SECTIONS.markers.finditer((ROOT / relative).read_text())}
    assert used == set(readme_tables.TABLES), f"tables never shown: {set(readme_tables.TABLES) - used}"
    for name, render in readme_tables.TABLES.items():
        text = render()
        assert "benchmarks/results/" in text and "`" in text, f"{name}: no record or command under the table"


def test_a_hand_edited_table_is_caught():
    name, sections = next(iter(readme_tables.TABLES)), readme_tables.SECTIONS
    edited = f"{sections.begin.format(name)}\n| a | number |\n|---|---|\n| typed | 0.42 |\n{sections.end.format(name)}\n"
    assert readme_tables.render(edited, "edited") != edited


def test_an_unknown_table_name_is_refused():
    sections = readme_tables.SECTIONS
    text = f"{sections.begin.format('no-such-table')}\n{sections.end.format('no-such-table')}\n"
    with pytest.raises(KeyError, match="no-such-table"):
        readme_tables.render(text, "README.md")


def test_the_rewrite_or_check_loop(tmp_path, capsys):
    """GeneratedSections.main, the loop both generators (this script and docs/cli_options.py) run:
    --check changes nothing and exits 1 with a diff where a section differs; without it the
    sections are rewritten (text outside them kept), after which --check passes."""
    from fastsae._files import GeneratedSections

    sections = GeneratedSections("tools/gen.py", "part")
    page = f"intro\n{sections.begin.format('a')}\nstale\n{sections.end.format('a')}\noutro\n"
    (tmp_path / "page.md").write_text(page)
    (tmp_path / "plain.md").write_text("no sections\n")

    def render(text, where):
        return sections.render(text, lambda name: f"fresh {name} of {where}")

    def run(*argv):
        return sections.main(list(argv), "test", tmp_path, ["page.md", "plain.md"], render,
                             what="parts", source="the source")

    assert run("--check") == 1
    out, err = capsys.readouterr()
    assert "-stale" in out and "+fresh a of page.md" in out
    assert "page.md: parts differ from the source; run python tools/gen.py" in err
    assert (tmp_path / "page.md").read_text() == page
    assert run() == 0
    assert "rewrote the parts in page.md" in capsys.readouterr().out
    assert (tmp_path / "page.md").read_text() == page.replace("stale", "fresh a of page.md")
    assert run("--check") == 0
