"""The main script reads top to bottom: its docstring's table of contents names its sections in their order."""
import re

from conftest import ROOT

SECTION = re.compile(r"^# -{75} (.+)$", re.M)


def table_of_contents(docstring: str) -> list[str]:
    """The names in the docstring's 'Sections' table: the text of each 4-space-indented line up to its description
    (two or more spaces), several names on one line separated by commas."""
    table = docstring.split("Sections,", 1)[1].split("\n\n", 1)[0]
    names = []
    for line in table.splitlines()[1:]:
        if line.startswith("    ") and not line.startswith("     "):
            names += [name.strip() for name in re.split(r"\s{2,}", line.strip())[0].split(",")]
    return names


def test_table_of_contents_matches_the_sections_in_order():
    source = (ROOT / "quantize_nvfp4.py").read_text()
    docstring = source.split('"""')[1]
    assert table_of_contents(docstring) == SECTION.findall(source)

