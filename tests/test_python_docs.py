"""docs/python.md runs: its ```python blocks, in order, in one namespace, in an empty
directory (issue 27, item 7). Tiny models, 2 training steps: the page is small on purpose."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_python_docs_snippets_run(tmp_path, monkeypatch, capsys):
    blocks = snippets(DOC.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    namespace: dict = {"__name__": "docs_python"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/python.md block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "4 prompts" in out and "weights.exact: unknown component" in out
    assert namespace["summary"]["steps"] == 2
    assert (tmp_path / "runs" / "dpo" / "final" / "README.md").is_file()
    assert namespace["results"]["policy"]["kl_to_reference"] is not None
