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
            for match in readme_tables.MARKERS.finditer((ROOT / relative).read_text())}
    assert used == set(readme_tables.TABLES), f"tables never shown: {set(readme_tables.TABLES) - used}"
    for name, render in readme_tables.TABLES.items():
        text = render()
        assert "benchmarks/results/" in text and "`" in text, f"{name}: no record or command under the table"


def test_a_hand_edited_table_is_caught():
    name = next(iter(readme_tables.TABLES))
    edited = f"{readme_tables.BEGIN.format(name)}\n| a | number |\n|---|---|\n| typed | 0.42 |\n{readme_tables.END.format(name)}\n"
    assert readme_tables.render(edited, "edited") != edited


def test_an_unknown_table_name_is_refused():
    text = f"{readme_tables.BEGIN.format('no-such-table')}\n{readme_tables.END.format('no-such-table')}\n"
    with pytest.raises(KeyError, match="no-such-table"):
        readme_tables.render(text, "README.md")
