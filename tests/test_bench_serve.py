"""``linspec bench serve`` where vLLM is not installed (linspec's own environment): one line and exit 2, nothing
written. The benchmark itself runs in the vLLM environment's suite (tests_vllm/test_bench_serve.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here: tests_vllm runs it")
def test_bench_serve_without_vllm_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "linspec", "bench", "serve", "--contexts", "64"],
                          capture_output=True, text=True, cwd=tmp_path, check=False)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "needs vLLM" in done.stderr and "linspec[vllm]" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no results folder made
