"""Chains of tiny ops run on the calling thread (``linspec.utils.threads``): the scope itself, a decode step's
state work (while the projections keep every thread) and the sparse cache's eviction loop."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_linspec

import linspec.ops.sparse_cache as sparse_cache_module
from linspec.config import PRESETS
from linspec.models import hf
from linspec.models.cache import new_cache_for
from linspec.models.terms.window import SoftmaxWindowTerm
from linspec.utils.threads import on_calling_thread


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_the_scope_runs_its_body_on_one_thread_and_restores_the_count_even_after_an_error(two_threads):
    with on_calling_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), on_calling_thread():
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with on_calling_thread(active=False):
        assert torch.get_num_threads() == 2


def _sparse_model():
    settings = PRESETS["window-hedgehog"] | {"local_window": 8, "sink_tokens": 2, "sparse_cache": 4}
    return tiny_linspec("llama", **settings).eval()


def _recorded(monkeypatch, owner, name: str) -> list[int]:
    """The thread count at every call of ``owner.name`` from now on."""
    seen, original = [], getattr(owner, name)

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return seen


@pytest.mark.parametrize(("rows", "step_threads"), [(1, 1), (2, 2)])
def test_a_one_row_decode_step_runs_its_terms_on_one_thread_and_the_projections_on_all(
    rows, step_threads, monkeypatch, two_threads
):
    model = _sparse_model()
    cache = new_cache_for(model)
    tokens = torch.randint(0, model.config.vocab_size, (rows, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(tokens, use_cache=True, **hf.cache_kwargs(cache))
        steps = _recorded(monkeypatch, SoftmaxWindowTerm, "step")
        projections = _recorded(monkeypatch, torch.nn.Linear, "forward")
        model(tokens[:, :1], use_cache=True, **hf.cache_kwargs(cache))
    assert steps == [step_threads] * model.config.num_hidden_layers
    assert projections and set(projections) == {2}
    assert torch.get_num_threads() == 2


def test_the_eviction_loop_runs_on_one_thread(monkeypatch, two_threads):
    model = _sparse_model()
    admissions = _recorded(monkeypatch, sparse_cache_module, "admission")  # called by the loop alone in a prefill
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(tokens, use_cache=True, **hf.cache_kwargs(new_cache_for(model)))
    assert len(admissions) >= 20 * model.config.num_hidden_layers  # the cache overflows: one call per eviction
    assert set(admissions) == {1}
    assert torch.get_num_threads() == 2
