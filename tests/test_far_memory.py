"""The far memory under the window's softmax (``linspec.ops.far_memory``): every mode, composed with the window as the
layer composes them, equals the dense reference built from the definition, in float64; and a converted model with
the ``window-hedgehog`` preset agrees with itself across modes, saves and loads its parameters, and keeps its
memory in its decode state."""

from __future__ import annotations

import copy
import math
from dataclasses import fields, replace

import pytest
import torch
from tiny_models import decode_one_by_one, tiny_base, tiny_linspec

import linspec
from linspec.config import PRESETS, LinspecConfig
from linspec.errors import LinspecError
from linspec.models import hf
from linspec.models.runner import ModelRunner
from linspec.ops.far_memory import (
    FarMemory,
    WindowWithMemory,
    empty_memory,
    far_memory_chunked,
    far_memory_commit,
    far_memory_extend,
    far_memory_reference,
    far_memory_step,
    far_memory_verify,
    memory_weights,
)
from linspec.ops.state import held_bytes
from linspec.ops.verify import TreeLayout
from linspec.ops.window import (
    SoftmaxWindow,
    empty_window,
    window_append,
    window_attention,
    window_extend,
    window_reference,
    window_step,
    window_verify,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS, KV_HEADS, DIM = 4, 2, 8
FIELDS = [f.name for f in fields(WindowWithMemory)]


def inputs(length: int, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, DIM, generator=generator, dtype=torch.float64)

    return rand(HEADS), rand(KV_HEADS), rand(KV_HEADS)


def far_memory(learnable: bool, seed: int = 3, decayed: bool = False) -> FarMemory:
    """Random parameters: the maps away from the identity and biases per head (with ``decayed``, distance exponents
    too, around 1), so a mix-up of heads or positions shows."""
    generator = torch.Generator().manual_seed(seed)

    def near_identity(heads: int) -> torch.Tensor:
        return torch.eye(DIM, dtype=torch.float64) + 0.5 * torch.randn(heads, DIM, DIM, generator=generator).double()

    bias = torch.randn(HEADS, generator=generator, dtype=torch.float64) + 1.0
    exponent = 1.0 + torch.randn(HEADS, generator=generator, dtype=torch.float64) if decayed else None
    if not learnable:
        return FarMemory(bias, distance_exponent=exponent)
    return FarMemory(bias, near_identity(HEADS), near_identity(KV_HEADS), exponent)


def sink_queries(q: torch.Tensor) -> torch.Tensor:
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=q.dtype)


def fresh(batch: int, window: SoftmaxWindow) -> WindowWithMemory:
    return empty_memory(empty_window(batch, KV_HEADS, DIM, DIM, window, torch.float64), DIM)


def chunked(q, k, v, window, memory, sink_q=None):
    return window_attention(q, k, v, window, sink_q, far_memory_chunked(q, k, v, window, memory))


def extend(q, k, v, state, position, window, memory, token_mask=None, sink_q=None):
    column, folded = far_memory_extend(q, k, v, state, position, window, memory, token_mask)
    out, after = window_extend(q, k, v, state, position, window, token_mask, sink_q, column)
    return out, replace(after, far_memory=folded)


def step(q, k, v, state, position, window, memory, sink_q=None, in_place=False):
    column, folded = far_memory_step(q, k, v, state, position, window, memory, in_place)
    out, after = window_step(q, k, v, state, position, window, sink_q, column)
    return out, replace(after, far_memory=folded)


WINDOWS = [(1, 0), (3, 0), (3, 2), (5, 1), (4, 9), (8, 3)]


def mean_distance_weight(window: int, count: int, alpha: float, reference: int | None = None) -> float:
    """``log(∫_W^{W+N} (d/W₀)^(−α) dd / N)`` by the trapezoid rule on a fine grid: the closed form's specification."""
    d = torch.linspace(window, window + count, 200001, dtype=torch.float64)
    return math.log(float(torch.trapezoid((d / (reference or window)) ** (-alpha), d)) / count)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.0 + 1e-6, 2.5, -0.7])
@pytest.mark.parametrize("reference", [None, 64])
def test_the_distance_decay_is_the_mean_weight_of_the_folded_distances(alpha, reference):
    """``log f`` for every query of a long sequence, including ``α`` at and next to 1 (the closed form's 0/0), for
    the configured window and for a training-time override of it (``W = 16`` under ``W₀ = 64``)."""
    window = SoftmaxWindow(16, 3, 1.0)
    bias = torch.tensor([0.25, -1.0], dtype=torch.float64)
    exponents = torch.tensor([alpha, 0.0], dtype=torch.float64)
    memory = FarMemory(bias, distance_exponent=exponents, reference_window=reference)
    positions = torch.arange(19, 400)[None]
    log_bias = memory.log_bias(positions, window)[0, :, :, 0]  # (H, T)
    for t in (19, 20, 47, 399):
        count = t - 16 - 3 + 1
        expected = 0.25 + mean_distance_weight(16, count, alpha, reference)
        assert float(log_bias[0, t - 19]) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    torch.testing.assert_close(log_bias[1], bias[1].expand(log_bias.shape[1]), rtol=0, atol=1e-12)  # α = 0: the count
    assert torch.equal(memory.log_bias(torch.tensor([[5]]), window), memory.log_bias(torch.tensor([[18]]), window))
    if reference is None:  # at the configured window, α only shapes the growth: the first far token weighs e^b
        assert float(log_bias[0, 0]) == pytest.approx(0.25, abs=abs(alpha) * 0.05 + 1e-12)


@pytest.mark.parametrize("decayed", [False, True])
def test_the_reference_is_the_definition_written_as_a_loop(decayed):
    """Token ``t``: the window's logits for its window and sinks, ``log(e^b f(N_t) φ_qᵀφ_k)`` for every token that has
    left it (``t − j ≥ W``, ``j ≥ n``; ``N_t`` of them), one softmax."""
    window, memory = SoftmaxWindow(3, 2, 0.45), far_memory(True, decayed=decayed)
    q, k, v = inputs(12, batch=1)
    weights = memory_weights(q, k, memory, torch.arange(12)[None], window)
    expected = torch.zeros_like(q)
    for t in range(12):
        for head in range(HEADS):
            kv = head // (HEADS // KV_HEADS)
            logits, rows = [], []
            for j in range(t + 1):
                if t - j < 3 or j < 2:
                    logits.append(q[0, head, t] @ k[0, kv, j] * 0.45)
                else:
                    logits.append(torch.log(weights[0, head, t, j]))
                rows.append(v[0, kv, j])
            expected[0, head, t] = torch.softmax(torch.stack(logits), 0) @ torch.stack(rows)
    torch.testing.assert_close(far_memory_reference(q, k, v, window, memory), expected)
    one = torch.tensor(1.0, dtype=torch.float64)
    features = memory.query_features(q[:, :1, :1])[0, 0, 0], memory.key_features(k[:, :1, 5:6])[0, 0, 0]
    if not decayed:
        torch.testing.assert_close(weights[0, 0, 0, 5], memory.bias[0].exp() * features[0] @ features[1])
    t = 9  # query 9 has evicted tokens 2 … 6, at distances 3 … 7
    log_bias = memory.bias[0] + (mean_distance_weight(3, 5, float(memory.distance_exponent[0])) if decayed else 0.0)
    features = memory.query_features(q[:, :1, t : t + 1])[0, 0, 0], memory.key_features(k[:, :1, 4:5])[0, 0, 0]
    torch.testing.assert_close(weights[0, 0, t, 4], log_bias.exp() * features[0] @ features[1])
    torch.testing.assert_close(features[0][:DIM].sum(), one)  # each half of φ is a softmax
    torch.testing.assert_close(features[0][DIM:].sum(), one)


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
@pytest.mark.parametrize("length", [5, 23, 70])
@pytest.mark.parametrize("decayed", [False, True])
def test_whole_sequence_equals_reference(size, sinks, length, adjacent, learnable, decayed):
    window, memory = SoftmaxWindow(size, sinks, 0.3), far_memory(learnable, decayed=decayed)
    q, k, v = inputs(length)
    sink_q = sink_queries(q) if adjacent else None
    torch.testing.assert_close(
        chunked(q, k, v, window, memory, sink_q), far_memory_reference(q, k, v, window, memory, sink_q)
    )


def test_inside_the_window_the_memory_changes_nothing():
    """Up to ``W + n`` tokens nothing is evicted: the layer is the window alone, whatever the memory's parameters."""
    window = SoftmaxWindow(6, 2, 0.3)
    q, k, v = inputs(30)
    with_memory = chunked(q, k, v, window, far_memory(True))
    alone = window_reference(q, k, v, window)
    torch.testing.assert_close(with_memory[:, :, :8], alone[:, :, :8])
    assert not torch.allclose(with_memory[:, :, 8:], alone[:, :, 8:], atol=1e-3)


def test_query_blocks_smaller_than_the_window(monkeypatch):
    import linspec.ops.far_memory as far_module
    import linspec.ops.window as window_module

    monkeypatch.setattr(window_module, "QUERY_BLOCK", 3)
    monkeypatch.setattr(far_module, "CHUNK", 4)
    window, memory = SoftmaxWindow(5, 2, 0.4), far_memory(True)
    q, k, v = inputs(37)
    sink_q = sink_queries(q)
    torch.testing.assert_close(
        chunked(q, k, v, window, memory, sink_q), far_memory_reference(q, k, v, window, memory, sink_q)
    )


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
@pytest.mark.parametrize("decayed", [False, True])
def test_extend_in_pieces_with_padding_equals_reference(size, sinks, adjacent, decayed, monkeypatch):
    """Rows advance by different, padded pieces and end where the reference does; the state equals one extend."""
    import linspec.ops.window as window_module

    monkeypatch.setattr(window_module, "EXTEND_SLICE", 5)  # pieces longer than a slice too
    window, memory = SoftmaxWindow(size, sinks, 0.5), far_memory(True, decayed=decayed)
    length = 25
    q, k, v = inputs(length)
    sink_q = sink_queries(q) if adjacent else None
    expected = far_memory_reference(q, k, v, window, memory, sink_q)
    state, position = fresh(2, window), torch.zeros(2, dtype=torch.long)
    cuts = [[0, 1, 9, 10, 18, 25], [0, 4, 5, 16, 17, 25]]
    outputs = [[], []]
    sources = (q, k, v) if sink_q is None else (q, k, v, sink_q)
    for piece in range(5):
        spans = [(cut[piece], cut[piece + 1]) for cut in cuts]
        width = max(hi - lo for lo, hi in spans) + 2
        pieces = [torch.zeros(2, x.shape[1], width, DIM, dtype=torch.float64) for x in sources]
        mask = torch.zeros(2, width, dtype=torch.bool)
        for row, (lo, hi) in enumerate(spans):
            columns = torch.arange(1, 1 + hi - lo) if piece % 2 else torch.arange(width - (hi - lo), width)
            for x, src in zip(pieces, sources, strict=True):
                x[row, :, columns] = src[row, :, lo:hi]
            mask[row, columns] = True
        sink_piece = pieces[3] if sink_q is not None else None
        out, state = extend(*pieces[:3], state, position, window, memory, mask, sink_piece)
        assert torch.all(out[~mask[:, None, :].expand(2, HEADS, width)] == 0)
        for row in range(2):
            outputs[row].append(out[row][:, mask[row]])
        position = position + mask.sum(1)
    for row in range(2):
        torch.testing.assert_close(torch.cat(outputs[row], dim=1), expected[row])
    one_go = extend(q, k, v, fresh(2, window), torch.zeros(2, dtype=torch.long), window, memory)[1]
    for name in FIELDS:
        torch.testing.assert_close(getattr(state, name), getattr(one_go, name))
    assert state.far_memory.shape == (2, KV_HEADS, 2 * DIM, DIM + 1)


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
@pytest.mark.parametrize("decayed", [False, True])
def test_decode_steps_equal_reference_and_extend(size, sinks, adjacent, decayed):
    """``window_step`` with the memory, one token at a time from the start, the rows of the batch at different
    positions (the second row starts later): outputs equal the reference and the state equals extend's. A step
    leaves its input state as it was, and folds into the input's own memory when asked to work in place."""
    window, memory = SoftmaxWindow(size, sinks, 0.3), far_memory(False, decayed=decayed)
    q, k, v = inputs(24)
    sink_q = sink_queries(q) if adjacent else None
    expected = far_memory_reference(q, k, v, window, memory, sink_q)
    first = torch.tensor([[True] * 5, [False, False, False, True, True]])
    _, state = extend(q[:, :, :5], k[:, :, :5], v[:, :, :5], fresh(2, window), torch.zeros(2, dtype=torch.long),
                      window, memory, first, None if sink_q is None else sink_q[:, :, :5])  # fmt: skip
    position = torch.tensor([5, 2])
    for t in range(5, 24):
        one = slice(t, t + 1)
        args = (q[:, :, one], k[:, :, one], v[:, :, one])
        sink = None if sink_q is None else sink_q[:, :, one]
        before = state.far_memory.clone()
        out, next_state = step(*args, state, position, window, memory, sink)
        torch.testing.assert_close(state.far_memory, before, rtol=0, atol=0)
        written = replace(state, far_memory=before)
        in_place_out, in_place = step(*args, written, position, window, memory, sink, in_place=True)
        torch.testing.assert_close(in_place_out, out, rtol=0, atol=0)
        torch.testing.assert_close(in_place.far_memory, next_state.far_memory, rtol=0, atol=0)
        assert in_place.far_memory is before
        torch.testing.assert_close(out[0, :, 0], expected[0, :, t])
        reference_out, reference_state = extend(*args, state, position, window, memory, None, sink)
        torch.testing.assert_close(out, reference_out)
        for name in FIELDS:
            torch.testing.assert_close(getattr(next_state, name), getattr(reference_state, name))
        state, position = next_state, position + 1
    second = torch.cat([torch.arange(3, 5), torch.arange(5, 24)])  # the second row's tokens, from position 0
    alone = far_memory_reference(*(x[1:, :, second] for x in (q, k, v)), window, memory,
                                 None if sink_q is None else sink_q[1:, :, second])  # fmt: skip
    torch.testing.assert_close(out[1, :, 0], alone[0, :, -1])


TREE = [-1, 0, 1, 0, 3, 4, 2, 6, 7, 1]  # depths up to 6: nodes deeper than a short window read their ancestors


def decode_path(q, k, v, state, position, window, memory, nodes, sink_q=None):
    outs = []
    for node in nodes:
        one = slice(node, node + 1)
        sink = None if sink_q is None else sink_q[:, :, one]
        out, state = extend(q[:, :, one], k[:, :, one], v[:, :, one], state, position, window, memory, None, sink)
        position = position + 1
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), [(1, 0), (3, 0), (3, 2), (4, 9), (40, 4)])
@pytest.mark.parametrize("committed", [0, 2, 5, 13])
@pytest.mark.parametrize("decayed", [False, True])
def test_verify_equals_decoding_each_path(size, sinks, committed, adjacent, decayed):
    window, memory = SoftmaxWindow(size, sinks, 0.7), far_memory(True, decayed=decayed)
    prefix = inputs(committed, batch=1, seed=1)
    state = extend(*prefix, fresh(1, window), torch.zeros(1, dtype=torch.long), window, memory)[1]
    position = torch.tensor([committed])
    q, k, v = inputs(len(TREE), batch=1, seed=2)
    sink_q = sink_queries(q) if adjacent else None
    layout = TreeLayout.of(torch.tensor([TREE]))
    column = far_memory_verify(q, k, v, state, position, layout, window, memory)
    out = window_verify(q, k, v, state, position, layout, window, sink_q, column)
    for leaf in range(len(TREE)):
        path = [leaf]
        while TREE[path[0]] >= 0:
            path.insert(0, TREE[path[0]])
        sequential, _ = decode_path(q, k, v, state, position, window, memory, path, sink_q)
        torch.testing.assert_close(out[:, :, leaf], sequential[:, :, -1])


@pytest.mark.parametrize(("size", "sinks"), [(1, 0), (3, 2), (4, 1)])
@pytest.mark.parametrize("committed", [0, 3, 9])
@pytest.mark.parametrize("decayed", [False, True])
def test_commit_of_an_accepted_path_equals_decoding_it(size, sinks, committed, decayed):
    window, memory = SoftmaxWindow(size, sinks, 0.7), far_memory(True, decayed=decayed)
    prefix = inputs(committed, batch=2, seed=1)
    state = extend(*prefix, fresh(2, window), torch.zeros(2, dtype=torch.long), window, memory)[1]
    position = torch.full((2,), committed)
    q, k, v = inputs(len(TREE), batch=2, seed=2)
    path = [0, 3, 4, 5]
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    keys, values = k[:, :, path], v[:, :, path]
    appended = replace(
        window_append(state, position, keys, values, mask),
        far_memory=far_memory_commit(state, position, keys, values, window, memory, mask),
    )
    for row, kept in enumerate([path, path[:2]]):
        one = slice(row, row + 1)
        rows = WindowWithMemory(**{name: getattr(state, name)[one] for name in FIELDS})
        _, decoded = decode_path(q[one], k[one], v[one], rows, position[one], window, memory, kept)
        for name in FIELDS:
            torch.testing.assert_close(getattr(appended, name)[row], getattr(decoded, name)[0])


def test_gradients_equal_reference_and_reach_the_memory_parameters():
    window = SoftmaxWindow(5, 2, 0.6)
    q, k, v = inputs(29)
    base = far_memory(True, decayed=True)
    parameters = (base.bias, base.query_map, base.key_map, base.distance_exponent)
    tensors = [x.clone().requires_grad_() for x in (q, k, v, sink_queries(q), *parameters)]
    weights = torch.randn(2, HEADS, 29, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (chunked, far_memory_reference):
        memory = FarMemory(*tensors[4:])
        (fn(*tensors[:3], window, memory, tensors[3]) * weights).sum().backward()
        grads.append([x.grad.clone() for x in tensors])
        for x in tensors:
            x.grad = None
    for fast, reference in zip(*grads, strict=True):
        torch.testing.assert_close(fast, reference)
    assert all(bool(g.abs().sum() > 0) for g in grads[0][4:])  # b, both maps and a learn from the first step


def test_gradcheck_on_a_tiny_case():
    window = SoftmaxWindow(2, 1, 0.5)
    q, k, v = inputs(7, batch=1)
    memory = far_memory(True, decayed=True)
    parameters = [x.clone().requires_grad_() for x in (memory.bias, memory.query_map, memory.key_map,
                                                       memory.distance_exponent)]  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda b, a_q, a_k, a, q, k: chunked(q, k, v, window, FarMemory(b, a_q, a_k, a)),
        (*parameters, q.clone().requires_grad_(), k.clone().requires_grad_()),
    )


# --- the model -----------------------------------------------------------------------------------------------

SETTINGS = {**PRESETS["window-hedgehog"], "local_window": 4, "sink_tokens": 2}
WINDOW_ONLY = {**SETTINGS, "memory_feature_map": "none", "memory_distance_decay": False}


def memory_model(seed: int = 4, **overrides):
    """A tiny converted model with the preset and random memory parameters (the maps away from the identity)."""
    model = tiny_linspec("qwen3", seed=seed, **{**SETTINGS, **overrides}).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.linspec_modules():
            for name in ("memory_feature_map_q", "memory_feature_map_k", "memory_bias", "memory_distance_exponent"):
                parameter = getattr(module, name, None)
                if parameter is not None:
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_settings_are_checked_and_the_preset_keeps_the_window():
    preset = LinspecConfig.from_preset("window-hedgehog")
    assert preset.far_memory and preset.softmax_window and preset.memory_feature_map == "hedgehog"
    assert preset.memory_distance_decay  # α = 0 at conversion: the same model as without it until trained
    assert LinspecConfig.from_dict(preset.to_dict()) == preset
    assert not LinspecConfig.from_preset("window").far_memory  # the default preset is unchanged
    with pytest.raises(LinspecError, match="memory_feature_map must be one of"):
        LinspecConfig(**{**PRESETS["window"], "memory_feature_map": "cosine"})
    with pytest.raises(LinspecError, match="needs local_kernel 'softmax'"):
        LinspecConfig(memory_feature_map="softmax")
    with pytest.raises(LinspecError, match="memory_feature_map must be a name"):
        LinspecConfig.from_dict({**PRESETS["window"], "memory_feature_map": 3})
    with pytest.raises(LinspecError, match="memory_distance_decay scales the far memory's column"):
        LinspecConfig(**{**PRESETS["window"], "memory_distance_decay": True})
    with pytest.raises(LinspecError, match="memory_distance_decay must be true or false"):
        LinspecConfig(**{**SETTINGS, "memory_distance_decay": "yes"})
    assert not preset.grouped_term and LinspecConfig.from_preset("window").grouped_term
    assert preset.sink_positions == "absolute" and LinspecConfig.from_preset("window").sink_positions == "adjacent"
    with pytest.raises(LinspecError, match="grouped_term must be true or false"):
        LinspecConfig.from_dict({**preset.to_dict(), "grouped_term": "no"})
    with pytest.raises(LinspecError, match="grouped_term false needs local_kernel 'softmax'"):
        LinspecConfig(grouped_term=False)
    with pytest.raises(LinspecError, match="global_decay and global_norm shape the grouped term"):
        LinspecConfig(**{**PRESETS["window"], "grouped_term": False})


@torch.no_grad()
def test_without_the_grouped_term_the_layer_is_its_window_and_far_memory():
    """``grouped_term`` false: no γ, conv or decay parameters and no state of theirs, and the output is exactly
    that of the same layer with the grouped term at γ = 0 and a zero conv (its term adds nothing there)."""
    base = tiny_base("qwen3", 1)
    lean = linspec.convert(copy.deepcopy(base), LinspecConfig(**SETTINGS)).double()
    grouped_settings = {**SETTINGS, "grouped_term": True, "global_decay": True, "global_norm": "mean"}
    grouped = linspec.convert(copy.deepcopy(base), LinspecConfig(**grouped_settings)).double()
    grouped_names = {"global_scale", "conv_weight", "decay_logit"}
    assert not grouped_names & {name.rsplit(".", 1)[-1] for name, _ in lean.named_parameters()}
    assert grouped_names <= {name.rsplit(".", 1)[-1] for name, _ in grouped.named_parameters()}
    for a, b in zip(lean.linspec_modules(), grouped.linspec_modules(), strict=True):
        for name in ("memory_bias", "memory_feature_map_q", "memory_feature_map_k", "memory_distance_exponent"):
            getattr(a, name).add_(0.3)  # a memory away from its initial values, the same in both
            getattr(b, name).copy_(getattr(a, name))
    ids = random_ids(1, 17, seed=2)
    torch.testing.assert_close(lean(ids).logits, grouped(ids).logits, rtol=0, atol=1e-12)
    cache = lean.new_cache()
    lean(ids[:, :9], **hf.cache_kwargs(cache))
    state = cache.linear_state(0)
    assert set(state.slices) == {"window"} and not any(k.startswith("grouped.") for k in state.tensors())
    grouped_cache = grouped.new_cache()
    grouped(ids[:, :9], **hf.cache_kwargs(grouped_cache))
    grouped_state = grouped_cache.linear_state(0)
    kept = held_bytes(t for k, t in grouped_state.tensors().items() if k.startswith("grouped."))
    assert kept > 0 and state.nbytes() == grouped_state.nbytes() - kept


def test_conversion_initialises_the_memory_parameters():
    model = linspec.convert(tiny_base("qwen3", 1), LinspecConfig(**SETTINGS))
    for module in model.linspec_modules():
        eye = torch.eye(module.head_dim)
        assert torch.equal(module.memory_feature_map_q.detach(), eye.expand(module.num_heads, -1, -1))
        assert torch.equal(module.memory_feature_map_k.detach(), eye.expand(module.num_kv_heads, -1, -1))
        bias = torch.full((module.num_heads,), module.head_dim / 2 / 4).log()  # e^b · 2/D = 1/W: flat maps
        torch.testing.assert_close(module.memory_bias.detach(), bias)
    plain = linspec.convert(tiny_base("qwen3", 1),
                            LinspecConfig(**{**SETTINGS, "memory_feature_map": "softmax"}))  # fmt: skip
    names = {name.rsplit(".", 1)[-1] for name, _ in plain.named_parameters()}
    assert "memory_bias" in names and "memory_feature_map_q" not in names  # the parameter-free map
    undecayed = linspec.convert(tiny_base("qwen3", 1), LinspecConfig(**{**SETTINGS, "memory_distance_decay": False}))
    assert not any(name.endswith("memory_distance_exponent") for name, _ in undecayed.named_parameters())
    decayed = linspec.convert(tiny_base("qwen3", 1), LinspecConfig(**{**SETTINGS, "memory_distance_decay": True}))
    for module in decayed.linspec_modules():  # α_h = 0: a fresh conversion weighs its far tokens by their count
        assert torch.equal(module.memory_distance_exponent.detach(), torch.zeros(module.num_heads))


@torch.no_grad()
@pytest.mark.parametrize(
    ("feature_map", "decayed", "grouped", "sinks"),
    [("hedgehog", False, False, "absolute"), ("softmax", False, False, "absolute"),
     ("hedgehog", True, False, "absolute"), ("hedgehog", True, True, "absolute"),
     ("hedgehog", True, False, "adjacent")],
)  # fmt: skip
def test_every_mode_of_the_model_agrees(feature_map, decayed, grouped, sinks):
    """A left-padded prefill, decode steps and an extend agree with each row's whole-sequence forward; a tree
    equals decoding its paths; after a commit a tree sees exactly the committed context — past the window. With
    ``grouped`` the layer also keeps the grouped term (random γ and conv) beside the window and its memory; with
    adjacent sinks the out-of-window sinks are scored from the frozen position in every mode."""
    extra = {"grouped_term": True, "global_decay": True, "global_norm": "mean"} if grouped else {}
    model = memory_model(memory_feature_map=feature_map, memory_distance_decay=decayed, sink_positions=sinks, **extra)
    ids = random_ids(2, 19, seed=5)
    window_only = tiny_linspec("qwen3", seed=4, **WINDOW_ONLY).double()
    assert not torch.allclose(model(ids).logits[:, 7:], window_only(ids).logits[:, 7:], atol=1e-4)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, :4] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    cache = model.new_cache()

    def forward(columns: slice) -> torch.Tensor:
        return model(
            ids[:, columns], attention_mask=mask[:, : columns.stop].long(), position_ids=positions[:, columns],
            **hf.cache_kwargs(cache),
        ).logits  # fmt: skip

    steps = [forward(slice(0, 9)), *(forward(slice(t, t + 1)) for t in range(9, 13)), forward(slice(13, 19))]
    cached = torch.cat(steps, dim=1)
    for row in range(2):
        alone = model(ids[row : row + 1, mask[row]], use_cache=False).logits[0]
        torch.testing.assert_close(cached[row, mask[row]], alone, rtol=0, atol=1e-10)

    parents = [-1, 0, 0, 1, 3, 2, 4, 6]
    runner = ModelRunner(model, 2)
    runner.extend(ids, mask)
    nodes = random_ids(2, len(parents), seed=6)
    tree, logits = runner.tree_logits(nodes, torch.tensor([parents] * 2))
    for row in range(2):
        for node in range(len(parents)):
            path = [node]
            while parents[path[0]] >= 0:
                path.insert(0, parents[path[0]])
            sequence = torch.cat([ids[row, mask[row]], nodes[row, path]])[None]
            torch.testing.assert_close(
                logits[row, node], decode_one_by_one(model, sequence)[0][0, -1], rtol=0, atol=1e-9
            )
    tree.commit(torch.tensor([[0, 1, 3, 4, 6], [0, 2, 5, 0, 0]]), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]).bool())
    following = random_ids(2, 2, seed=7)
    _, after = runner.tree_logits(following, torch.tensor([[-1, 0]] * 2))
    for row, path in enumerate([[0, 1, 3, 4, 6], [0, 2, 5]]):
        sequence = torch.cat([ids[row, mask[row]], nodes[row, path], following[row]])[None]
        torch.testing.assert_close(after[row], decode_one_by_one(model, sequence)[0][0, -2:], rtol=0, atol=1e-9)


@torch.no_grad()
def test_the_memory_is_in_the_decode_state_and_its_size():
    from linspec.models.cache_size import measured_cache_growth

    model = memory_model().float()
    window_only = tiny_linspec("qwen3", seed=4, **WINDOW_ONLY)
    cache = model.new_cache()
    model(random_ids(1, 12), **hf.cache_kwargs(cache))
    state = cache.linear_state(0)
    module = model.linspec_modules()[0]
    memory = state.slices["window"].far_memory
    assert memory.shape == (1, module.num_kv_heads, 2 * module.head_dim, module.head_dim + 1) and memory.any()
    assert "window.far_memory" in state.tensors()
    grown = measured_cache_growth(model).fixed - measured_cache_growth(window_only).fixed
    assert grown == len(model.linspec_modules()) * memory.numel() * memory.element_size()
    assert measured_cache_growth(model).per_token == 0  # constant in context length


@torch.no_grad()
def test_the_parameters_survive_save_and_load_and_reset(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = memory_model(memory_distance_decay=True).float()
    ids = random_ids(1, 16)
    model.save_pretrained(tmp_path / "model")
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert any(name.endswith("memory_feature_map_q") for name in saved)
    assert any(name.endswith("memory_bias") for name in saved)
    assert any(name.endswith("memory_distance_exponent") for name in saved)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    module = loaded.linspec_modules()[1]
    module.reset_linspec_parameters()
    assert torch.equal(module.memory_feature_map_k.detach(), torch.eye(module.head_dim).expand(2, -1, -1))


@torch.no_grad()
def test_the_far_memory_ablation_is_the_window_alone():
    from linspec.evaluation.perplexity import ABLATE_CHOICES, ablated, ablation_components, variant_name

    model = memory_model()
    ids = random_ids(1, 20)
    full = model(ids).logits
    components = ablation_components("far-memory", model)
    assert variant_name(model, components) == "no-far-memory"
    with ablated(model, components):
        off = model(ids).logits
    torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0)  # restored
    without = memory_model(memory_feature_map="none", memory_distance_decay=False)
    torch.testing.assert_close(off, without(ids).logits, rtol=0, atol=1e-12)
    with ablated(model, ablation_components("window-only", model)):
        assert "far_memory" in ABLATE_CHOICES["window-only"]
        with ablated(without, ablation_components("window-only", without)):
            torch.testing.assert_close(model(ids).logits, without(ids).logits, rtol=0, atol=1e-12)
    with pytest.raises(LinspecError, match="far memory"):
        ablation_components("far-memory", without)


@torch.no_grad()
def test_a_model_without_the_grouped_term_refuses_gamma_and_conv_ablations_and_keeps_window_only():
    from linspec.evaluation.perplexity import ABLATIONS, ablated, ablation_components, ablation_variants

    model = memory_model()
    assert ablation_variants(model) == [ABLATIONS["full"], ABLATIONS["local-only"]]
    for choice in ("gamma", "conv"):
        with pytest.raises(LinspecError, match=f"{choice} needs the grouped term"):
            ablation_components(choice, model)
    ids = random_ids(1, 17, seed=3)
    full = model(ids).logits
    window_only = tiny_linspec("qwen3", seed=4, **WINDOW_ONLY).double()
    with ablated(model, ablation_components("window-only", model)):
        torch.testing.assert_close(model(ids).logits, window_only(ids).logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0)  # restored
    assert len(ablation_variants(memory_model(grouped_term=True, global_decay=True, global_norm="mean"))) == 4
