"""Fixtures for the vLLM plugin's tests, which run in an environment holding vLLM (``/work/vllm-env``-like):
a converted demo model, built once per session with this environment's linspec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# One engine in this process (the plugin registers here, no plugin entry point needed), state pages of 1 GiB.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def window_model(tmp_path_factory) -> Path:
    """The demo model converted with the default (window) preset: every layer linear, a 512-token window."""
    out = tmp_path_factory.mktemp("models") / "window"
    subprocess.run([sys.executable, "-m", "linspec", "convert", "smollm2-135m", str(out)], check=True)
    return out
