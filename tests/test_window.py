"""The softmax window (``linspec.ops.window``): every mode equals the dense masked reference, in float64."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from linspec.ops import empty_state
from linspec.ops.verify import TreeLayout
from linspec.ops.window import (
    SoftmaxWindow,
    empty_window,
    window_append,
    window_attention,
    window_extend,
    window_reference,
    window_verify,
)

HEADS, KV_HEADS, DIM = 4, 2, 8


def inputs(length: int, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, DIM, generator=generator, dtype=torch.float64)

    return rand(HEADS), rand(KV_HEADS), rand(KV_HEADS)


def fresh_state(batch: int, window: SoftmaxWindow):
    state = empty_state(batch, KV_HEADS, DIM, DIM, 4, 3, torch.float64)
    return replace(state, **empty_window(batch, KV_HEADS, DIM, DIM, window, torch.float64))


def advanced(state, count: int | torch.Tensor):
    """The window functions leave ``position`` to the grouped ops; tests advance it themselves."""
    return replace(state, position=state.position + count)


WINDOWS = [(1, 0), (3, 0), (3, 2), (5, 1), (8, 3), (40, 4), (4, 9)]


@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
@pytest.mark.parametrize("length", [1, 7, 16, 23])
def test_full_sequence_equals_reference(size, sinks, length):
    window = SoftmaxWindow(size, sinks, 0.3)
    q, k, v = inputs(length)
    torch.testing.assert_close(window_attention(q, k, v, window), window_reference(q, k, v, window))


def test_the_mask_is_a_window_plus_sinks():
    """Changing a value outside the window and past the sinks changes nothing; inside, or a sink, it does."""
    window = SoftmaxWindow(3, 2, 1.0)
    q, k, v = inputs(10, batch=1)
    base = window_attention(q, k, v, window)[:, :, 9]
    for position, seen in [(0, True), (1, True), (2, False), (6, False), (7, True), (9, True)]:
        changed = v.clone()
        changed[:, :, position] += 1.0
        assert seen == (not torch.allclose(window_attention(q, k, changed, window)[:, :, 9], base))


@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
def test_extend_in_pieces_with_padding_equals_reference(size, sinks):
    """Rows advance by different, padded pieces (padding anywhere) and end where the reference does."""
    window = SoftmaxWindow(size, sinks, 0.5)
    length = 19
    q, k, v = inputs(length)
    expected = window_reference(q, k, v, window)
    state = fresh_state(2, window)
    cuts = [[0, 1, 5, 6, 13, 19], [0, 4, 5, 11, 12, 19]]  # each row's real tokens per call
    outputs = [[], []]
    for piece in range(5):
        spans = [(cut[piece], cut[piece + 1]) for cut in cuts]
        width = max(hi - lo for lo, hi in spans) + 2
        qq, kk, vv = (torch.zeros(2, x.shape[1], width, DIM, dtype=torch.float64) for x in (q, k, v))
        mask = torch.zeros(2, width, dtype=torch.bool)
        for row, (lo, hi) in enumerate(spans):
            columns = torch.arange(1, 1 + hi - lo) if piece % 2 else torch.arange(width - (hi - lo), width)
            for x, src in ((qq, q), (kk, k), (vv, v)):
                x[row, :, columns] = src[row, :, lo:hi]
            mask[row, columns] = True
        out, state = window_extend(qq, kk, vv, state, window, mask)
        assert torch.all(out[~mask[:, None, :].expand(2, HEADS, width)] == 0)
        for row in range(2):
            outputs[row].append(out[row][:, mask[row]])
        state = advanced(state, mask.sum(1))
    for row in range(2):
        torch.testing.assert_close(torch.cat(outputs[row], dim=1), expected[row])
    one_go = advanced(window_extend(q, k, v, fresh_state(2, window), window)[1], length)
    for name in ("window_keys", "window_values", "sink_keys", "sink_values"):
        torch.testing.assert_close(getattr(state, name), getattr(one_go, name))


def test_long_extends_run_in_slices_and_agree(monkeypatch):
    import linspec.ops.window as window_module

    window = SoftmaxWindow(5, 2, 0.4)
    q, k, v = inputs(21)
    whole, whole_state = window_extend(q, k, v, fresh_state(2, window), window)
    monkeypatch.setattr(window_module, "EXTEND_SLICE", 4)
    sliced, sliced_state = window_extend(q, k, v, fresh_state(2, window), window)
    torch.testing.assert_close(sliced, whole)
    torch.testing.assert_close(whole, window_reference(q, k, v, window))
    torch.testing.assert_close(sliced_state.window_keys, whole_state.window_keys)
    assert torch.equal(sliced_state.position, whole_state.position)  # position stays for the grouped ops


def decode_path(q, k, v, state, window, nodes: list[int]):
    """Outputs of the path's nodes decoded one token at a time."""
    outs = []
    for node in nodes:
        out, state = window_extend(q[:, :, node : node + 1], k[:, :, node : node + 1], v[:, :, node : node + 1],
                                   state, window)  # fmt: skip
        state = advanced(state, 1)
        outs.append(out)
    return torch.cat(outs, dim=2), state


TREE = [-1, 0, 1, 0, 3, 4, 2, 6, 7, 1]  # two branches from the root, one from node 1; depths up to 6


@pytest.mark.parametrize(("size", "sinks"), [(3, 0), (3, 2), (4, 9), (40, 4), (1, 1)])
@pytest.mark.parametrize("committed", [0, 1, 2, 5, 11])
def test_verify_equals_decoding_each_path(size, sinks, committed):
    window = SoftmaxWindow(size, sinks, 0.7)
    prefix = inputs(committed, batch=1, seed=1)
    state = advanced(window_extend(*prefix, fresh_state(1, window), window)[1], committed)
    q, k, v = inputs(len(TREE), batch=1, seed=2)
    parents = torch.tensor([TREE])
    out = window_verify(q, k, v, state, TreeLayout.of(parents), window)
    for leaf in range(len(TREE)):
        path = [leaf]
        while TREE[path[0]] >= 0:
            path.insert(0, TREE[path[0]])
        sequential, _ = decode_path(q, k, v, state, window, path)
        torch.testing.assert_close(out[:, :, leaf], sequential[:, :, -1])


@pytest.mark.parametrize("committed", [0, 3, 9])
def test_append_of_an_accepted_path_equals_decoding_it(committed):
    window = SoftmaxWindow(4, 3, 0.7)
    prefix = inputs(committed, batch=2, seed=1)
    state = advanced(window_extend(*prefix, fresh_state(2, window), window)[1], committed)
    q, k, v = inputs(len(TREE), batch=2, seed=2)
    path = [0, 3, 4, 5]
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    appended = window_append(state, k[:, :, path], v[:, :, path], mask)
    for row, kept in enumerate([path, path[:2]]):
        _, decoded = decode_path(q[row : row + 1], k[row : row + 1], v[row : row + 1],
                                 state.map(lambda t, row=row: t[row : row + 1]), window, kept)  # fmt: skip
        for name in ("window_keys", "window_values", "sink_keys", "sink_values"):
            torch.testing.assert_close(getattr(appended, name)[row], getattr(decoded, name)[0])


def test_gradients_equal_reference():
    window = SoftmaxWindow(5, 2, 0.6)
    tensors = [x.requires_grad_() for x in inputs(17)]
    weights = torch.randn(2, HEADS, 17, DIM, dtype=torch.float64)
    grads = []
    for fn in (window_attention, window_reference):
        (fn(*tensors, window) * weights).sum().backward()
        grads.append([x.grad.clone() for x in tensors])
        for x in tensors:
            x.grad = None
    for fast, reference in zip(*grads, strict=True):
        torch.testing.assert_close(fast, reference)
