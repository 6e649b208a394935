"""The README's first example runs as written on the shipped anchor model and prints what the README says it prints
(so the example and its quoted output cannot drift apart)."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def first_example() -> tuple[str, str]:
    """(code of the README's first python block, the output quoted right after it as "prints `...`")."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"```python\n(.*?)```\n\nprints `(.*?)`", text, re.S)
    assert match, "the README's first python block must be followed by 'prints `<its output>`'"
    return match.group(1), match.group(2)


@pytest.mark.integration
def test_the_first_readme_example_prints_what_the_readme_says():
    code, quoted = first_example()
    assert "AnchorCache()" in code  # issue 17: the first example is AnchorCache() with no arguments
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert printed.getvalue().strip() == quoted


def test_the_headline_table_is_the_committed_results():
    """Every score of the README's headline table is the committed RULER average it quotes (ruler_average.json, written
    by experiments/kvzip/ruler_headline.py from the grid), with its interval: the table cannot drift from the data."""
    import json

    text = README.read_text(encoding="utf-8")
    block = text[text.index("<!-- headline:start -->"):text.index("<!-- headline:end -->")]
    data = json.loads((README.parent / "docs/results/ruler4k-headline-qwen2.5-0.5b/ruler_average.json").read_text())
    table = {}
    header = None
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| query"):
            header = cells
        elif line.startswith("| ") and header and not line.startswith("|---"):
            table[(cells[0], cells[1])] = dict(zip(header[2:], cells[2:]))
    assert data["rows"] and len(table) == len({(r["query"], r["strategy"]) for r in data["rows"]})
    for row in data["rows"]:
        ci = row["ci"]
        score = f"{100 * row['average']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"
        column = "no budget (KV kept)" if row["budget"] == "-" else f"{float(row['budget']):.0%} kept"
        assert table[(row["query"], row["strategy"])][column].startswith(score), (row["query"], row["strategy"], column)


def _headline_script():
    """experiments/kvzip/ruler_headline.py as a module (it imports its folder's needle_table)."""
    import sys

    sys.path.insert(0, str(README.parent / "experiments" / "kvzip"))
    try:
        import ruler_headline
    finally:
        sys.path.pop(0)
    return ruler_headline


def test_the_headline_script_rewrites_the_readme_table_to_what_it_is():
    """ruler_headline.py --readme, given the committed rows, leaves the README as it is (the table is its output, in
    its layout); another table replaces the old one only, and a README without one block and one table is refused."""
    import json

    script = _headline_script()
    text = README.read_text(encoding="utf-8")
    rows = json.loads((README.parent / "docs/results/ruler4k-headline-qwen2.5-0.5b/ruler_average.json").read_text())
    table = script.pivot(rows["rows"], label=lambda row: row["strategy"], score=script._score, kept="kept_fraction")
    assert script.replace_headline_table(text, table) == text
    changed = script.replace_headline_table(text, ["| a |", "|---|", "| 1 |"])
    assert "| a |\n|---|\n| 1 |\n" in changed and "| query |" not in changed
    assert changed.replace("| a |\n|---|\n| 1 |", "\n".join(table)) == text
    with pytest.raises(SystemExit, match="block"):
        script.replace_headline_table(text.replace("<!-- headline:end -->", ""), table)
    with pytest.raises(SystemExit, match="one markdown table"):
        script.replace_headline_table(text.replace("\n![RULER", "\n| second |\n![RULER"), table)
