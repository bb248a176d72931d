"""The README's Python snippet for the compatibility class runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_compatibility_snippet_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Use the loss in your own training code"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(snippet, "README.md", "exec"), {})
    assert "loss=" in capsys.readouterr().out
