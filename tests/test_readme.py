"""The README's Python blocks run as written, in order, on the demo model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_a_quickstart():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert any("linspec.load(" in b for b in blocks) and any("speculative_generate(" in b for b in blocks)


@pytest.mark.slow
def test_the_readme_python_blocks_run_in_order(tmp_path, monkeypatch, demo_model_path, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    assert (tmp_path / "out" / "quickstart-run" / "model" / "README.md").is_file()
    assert namespace["fast"].stats.new_tokens > 0
