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
