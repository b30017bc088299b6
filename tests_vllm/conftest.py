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


@pytest.fixture(scope="session")
def softmax_layers_model(tmp_path_factory) -> Path:
    """A hybrid by layers: the window preset with decoder layers 0 and 15 kept as softmax attention."""
    out = tmp_path_factory.mktemp("models") / "softmax-layers"
    subprocess.run(
        [sys.executable, "-m", "linspec", "convert", "smollm2-135m", str(out), "--softmax-layers", "0,15"], check=True
    )
    return out


@pytest.fixture(scope="session")
def softmax_heads_model(tmp_path_factory) -> Path:
    """A hybrid by heads: the window preset with kv head 1 of layer 4 and kv heads 0 and 2 of layer 7 kept as
    softmax attention over the whole context (layers keeping one and two of their three heads)."""
    out = tmp_path_factory.mktemp("models") / "softmax-heads"
    subprocess.run(
        [sys.executable, "-m", "linspec", "convert", "smollm2-135m", str(out), "--softmax-heads", "4:1,7:0,7:2"],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Builds tiny converted models (``tiny.build``) on demand, each once per session, by a name of the test's."""
    from tiny import build

    from linspec.sources.demo_models import demo_model_dir

    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def model(name: str, arch: str, *convert_flags: str, **overrides) -> Path:
        if name not in built:
            built[name] = build(arch, root / name, demo_model_dir("smollm2-135m"), *convert_flags, **overrides)
        return built[name]

    return model
