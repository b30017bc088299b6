"""The softmax window (``linspec.ops.window``): every mode equals the dense masked reference, in float64."""

from __future__ import annotations

import itertools
from dataclasses import fields

import pytest
import torch

from linspec.ops.extend import RING_ROOM, appended_in_place, newest
from linspec.ops.state import held_bytes
from linspec.ops.verify import TreeLayout
from linspec.ops.window import (
    SoftmaxWindow,
    WindowState,
    empty_window,
    window_append,
    window_attention,
    window_extend,
    window_reference,
    window_step,
    window_verify,
)

HEADS, KV_HEADS, DIM = 4, 2, 8


def inputs(length: int, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(batch, heads, length, DIM, generator=generator, dtype=torch.float64)

    return rand(HEADS), rand(KV_HEADS), rand(KV_HEADS)


FIELDS = [f.name for f in fields(WindowState)]


def fresh_state(batch: int, window: SoftmaxWindow) -> WindowState:
    return empty_window(batch, KV_HEADS, DIM, DIM, window, torch.float64)


def start(batch: int) -> torch.Tensor:
    """Each row's position before any token. The window functions read positions and never advance them (the
    layer does): tests advance them themselves."""
    return torch.zeros(batch, dtype=torch.long)


def rows_of(state: WindowState, rows: slice) -> WindowState:
    return WindowState(**{name: getattr(state, name)[rows] for name in FIELDS})


def sink_queries(q: torch.Tensor, adjacent: bool) -> torch.Tensor | None:
    """Queries for out-of-window sinks (adjacent sink positions), independent of ``q`` so any mix-up shows."""
    if not adjacent:
        return None
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=q.dtype)


WINDOWS = [(1, 0), (3, 0), (3, 2), (5, 1), (8, 3), (40, 4), (4, 9)]


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
@pytest.mark.parametrize("length", [1, 7, 16, 23])
def test_full_sequence_equals_reference(size, sinks, length, adjacent):
    window = SoftmaxWindow(size, sinks, 0.3)
    q, k, v = inputs(length)
    sink_q = sink_queries(q, adjacent)
    torch.testing.assert_close(window_attention(q, k, v, window, sink_q), window_reference(q, k, v, window, sink_q))


@pytest.mark.parametrize("query_block", [1, 2, 3])
@pytest.mark.parametrize(("size", "sinks"), [(3, 2), (5, 1), (8, 3), (4, 9)])
def test_query_blocks_smaller_than_the_window_equal_reference(monkeypatch, query_block, size, sinks):
    """Blocks of fewer queries than the window (long sequences under large windows), the last one padded."""
    import linspec.ops.window as window_module

    monkeypatch.setattr(window_module, "QUERY_BLOCK", query_block)
    window = SoftmaxWindow(size, sinks, 0.3)
    q, k, v = inputs(29)
    sink_q = sink_queries(q, True)
    tensors = [x.clone().requires_grad_() for x in (q, k, v, sink_q)]
    out = window_attention(*tensors[:3], window, tensors[3])
    torch.testing.assert_close(out, window_reference(q, k, v, window, sink_q))
    out.square().sum().backward()
    reference = [x.clone().requires_grad_() for x in (q, k, v, sink_q)]
    window_reference(*reference[:3], window, reference[3]).square().sum().backward()
    for fast, slow in zip(tensors, reference, strict=True):
        torch.testing.assert_close(fast.grad, slow.grad)


@pytest.mark.parametrize(("size", "sinks"), [(3, 2), (5, 1), (4, 9), (2, 3)])
def test_reference_scores_far_sinks_with_sink_queries_past_p(size, sinks):
    """The reference against a per-token loop written from the definition: token ``t`` sees sinks and window;
    a sink outside the window is scored with ``sink_q[t]`` once ``t > P = W + n − 1``, with ``q[t]`` before."""
    window = SoftmaxWindow(size, sinks, 0.45)
    q, k, v = inputs(15, batch=1)
    sink_q = sink_queries(q, True)
    expected = torch.zeros_like(q)
    for t in range(15):
        seen = [s for s in range(t + 1) if t - s < size or s < sinks]
        for head in range(HEADS):
            kv = head // (HEADS // KV_HEADS)
            logits = torch.stack([
                (sink_q if t - s >= size and t > size + sinks - 1 else q)[0, head, t] @ k[0, kv, s] * 0.45
                for s in seen
            ])  # fmt: skip
            expected[0, head, t] = torch.softmax(logits, dim=0) @ v[0, kv, seen]
    torch.testing.assert_close(window_reference(q, k, v, window, sink_q), expected)


def test_the_mask_is_a_window_plus_sinks():
    """Changing a value outside the window and past the sinks changes nothing; inside, or a sink, it does."""
    window = SoftmaxWindow(3, 2, 1.0)
    q, k, v = inputs(10, batch=1)
    base = window_attention(q, k, v, window)[:, :, 9]
    for position, seen in [(0, True), (1, True), (2, False), (6, False), (7, True), (9, True)]:
        changed = v.clone()
        changed[:, :, position] += 1.0
        assert seen == (not torch.allclose(window_attention(q, k, changed, window)[:, :, 9], base))


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), WINDOWS)
def test_extend_in_pieces_with_padding_equals_reference(size, sinks, adjacent):
    """Rows advance by different, padded pieces (padding anywhere) and end where the reference does."""
    window = SoftmaxWindow(size, sinks, 0.5)
    length = 19
    q, k, v = inputs(length)
    sink_q = sink_queries(q, adjacent)
    expected = window_reference(q, k, v, window, sink_q)
    state, position = fresh_state(2, window), start(2)
    cuts = [[0, 1, 5, 6, 13, 19], [0, 4, 5, 11, 12, 19]]  # each row's real tokens per call
    outputs = [[], []]
    for piece in range(5):
        spans = [(cut[piece], cut[piece + 1]) for cut in cuts]
        width = max(hi - lo for lo, hi in spans) + 2
        sources = (q, k, v) if sink_q is None else (q, k, v, sink_q)
        pieces = [torch.zeros(2, x.shape[1], width, DIM, dtype=torch.float64) for x in sources]
        mask = torch.zeros(2, width, dtype=torch.bool)
        for row, (lo, hi) in enumerate(spans):
            columns = torch.arange(1, 1 + hi - lo) if piece % 2 else torch.arange(width - (hi - lo), width)
            for x, src in zip(pieces, sources, strict=True):
                x[row, :, columns] = src[row, :, lo:hi]
            mask[row, columns] = True
        qq, kk, vv = pieces[:3]
        out, state = window_extend(qq, kk, vv, state, position, window, mask, pieces[3] if sink_q is not None else None)
        assert torch.all(out[~mask[:, None, :].expand(2, HEADS, width)] == 0)
        for row in range(2):
            outputs[row].append(out[row][:, mask[row]])
        position = position + mask.sum(1)
    for row in range(2):
        torch.testing.assert_close(torch.cat(outputs[row], dim=1), expected[row])
    one_go = window_extend(q, k, v, fresh_state(2, window), start(2), window)[1]
    for name in FIELDS:
        torch.testing.assert_close(getattr(state, name), getattr(one_go, name))


def test_long_extends_run_in_slices_and_agree(monkeypatch):
    import linspec.ops.window as window_module

    window = SoftmaxWindow(5, 2, 0.4)
    q, k, v = inputs(21)
    sink_q = sink_queries(q, True)
    whole, whole_state = window_extend(q, k, v, fresh_state(2, window), start(2), window, sink_q=sink_q)
    monkeypatch.setattr(window_module, "EXTEND_SLICE", 4)
    sliced, sliced_state = window_extend(q, k, v, fresh_state(2, window), start(2), window, sink_q=sink_q)
    torch.testing.assert_close(sliced, whole)
    torch.testing.assert_close(whole, window_reference(q, k, v, window, sink_q))
    for name in FIELDS:
        torch.testing.assert_close(getattr(sliced_state, name), getattr(whole_state, name))


def decode_path(q, k, v, state, position, window, nodes: list[int], sink_q=None):
    """Outputs of the path's nodes decoded one token at a time, and the window after them."""
    outs = []
    for node in nodes:
        one = slice(node, node + 1)
        sink_one = None if sink_q is None else sink_q[:, :, one]
        out, state = window_extend(q[:, :, one], k[:, :, one], v[:, :, one], state, position, window, sink_q=sink_one)
        position = position + 1
        outs.append(out)
    return torch.cat(outs, dim=2), state


TREE = [-1, 0, 1, 0, 3, 4, 2, 6, 7, 1]  # two branches from the root, one from node 1; depths up to 6


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), [(3, 0), (3, 2), (4, 9), (40, 4), (1, 1)])
@pytest.mark.parametrize("committed", [0, 1, 2, 5, 11])
def test_verify_equals_decoding_each_path(size, sinks, committed, adjacent):
    window = SoftmaxWindow(size, sinks, 0.7)
    prefix = inputs(committed, batch=1, seed=1)
    state = window_extend(*prefix, fresh_state(1, window), start(1), window)[1]
    position = start(1) + committed
    q, k, v = inputs(len(TREE), batch=1, seed=2)
    sink_q = sink_queries(q, adjacent)
    parents = torch.tensor([TREE])
    out = window_verify(q, k, v, state, position, TreeLayout.of(parents), window, sink_q)
    for leaf in range(len(TREE)):
        path = [leaf]
        while TREE[path[0]] >= 0:
            path.insert(0, TREE[path[0]])
        sequential, _ = decode_path(q, k, v, state, position, window, path, sink_q)
        torch.testing.assert_close(out[:, :, leaf], sequential[:, :, -1])


@pytest.mark.parametrize("committed", [0, 3, 9])
def test_append_of_an_accepted_path_equals_decoding_it(committed):
    window = SoftmaxWindow(4, 3, 0.7)
    prefix = inputs(committed, batch=2, seed=1)
    state = window_extend(*prefix, fresh_state(2, window), start(2), window)[1]
    position = start(2) + committed
    q, k, v = inputs(len(TREE), batch=2, seed=2)
    path = [0, 3, 4, 5]
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    appended = window_append(state, position, k[:, :, path], v[:, :, path], mask)
    for row, kept in enumerate([path, path[:2]]):
        one = slice(row, row + 1)
        _, decoded = decode_path(q[one], k[one], v[one], rows_of(state, one), position[one], window, kept)
        for name in FIELDS:
            torch.testing.assert_close(getattr(appended, name)[row], getattr(decoded, name)[0])


def test_gradients_equal_reference():
    window = SoftmaxWindow(5, 2, 0.6)
    q, k, v = inputs(17)
    tensors = [x.requires_grad_() for x in (q, k, v, sink_queries(q, True))]
    weights = torch.randn(2, HEADS, 17, DIM, dtype=torch.float64)
    grads = []
    for fn in (window_attention, window_reference):
        (fn(*tensors[:3], window, tensors[3]) * weights).sum().backward()
        grads.append([x.grad.clone() for x in tensors])
        for x in tensors:
            x.grad = None
    for fast, reference in zip(*grads, strict=True):
        torch.testing.assert_close(fast, reference)


@pytest.mark.parametrize("adjacent", [False, True])
@pytest.mark.parametrize(("size", "sinks"), [(1, 0), (3, 0), (3, 2), (5, 1), (4, 9), (8, 3)])
def test_decode_step_equals_extend_by_one_token(size, sinks, adjacent):
    """``window_step`` (the decode fast path) against ``window_extend`` with one token, every step from the
    start past ``P``, the rows of the batch at different positions; outputs and every window field. Decoding in
    place (the ring moving along its buffer, re-made every ``RING_ROOM`` steps) gives the same at every step,
    and leaves every earlier state's ring as it was."""
    window = SoftmaxWindow(size, sinks, 0.3)
    q, k, v = inputs(30, batch=2)
    sink_q = sink_queries(q, adjacent)
    first = torch.tensor([[True] * 5, [False, True, False, True, False]])
    prefix = (q[:1, :, :5].expand(2, -1, -1, -1), k[:, :, :5], v[:, :, :5])
    _, state = window_extend(*prefix, fresh_state(2, window), start(2), window, first)
    position = torch.tensor([5, 2])
    written, earlier = state, []
    for t in range(5, 30):
        step = slice(t, t + 1)
        args = (q[:, :, step], k[:, :, step], v[:, :, step])
        sink = None if sink_q is None else sink_q[:, :, step]
        expected, expected_state = window_extend(*args, state, position, window, sink_q=sink)
        out, next_state = window_step(*args, state, position, window, sink)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        in_place_out, written_next = window_step(*args, written, position, window, sink, in_place=True)
        torch.testing.assert_close(in_place_out, out, rtol=0, atol=0)
        for name in FIELDS:
            torch.testing.assert_close(getattr(next_state, name), getattr(expected_state, name), rtol=0, atol=0)
            torch.testing.assert_close(getattr(written_next, name), getattr(next_state, name), rtol=0, atol=0)
        earlier.append((written.keys, written.keys.clone()))
        state, written, position = next_state, written_next, position + 1
    for ring, as_it_was in earlier:
        torch.testing.assert_close(ring, as_it_was, rtol=0, atol=0)


def test_a_ring_appended_in_place_moves_along_its_buffer_and_is_re_made_when_full():
    """The first append moves a plain ring into a buffer with ``RING_ROOM`` entries of room; the next ones write
    into that room (the same storage, one entry further along) until it is full, then a fresh buffer; every
    result equals ``newest``'s. A ring that is part of another tensor (a slice of the sequence, as ``newest``
    leaves it) is never written into."""
    ring = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    storages = []
    for _ in range(2 * RING_ROOM + 3):
        new = torch.randn(2, 3, 1, 4, dtype=torch.float64)
        appended = appended_in_place(ring, new)
        torch.testing.assert_close(appended, newest(ring, new, torch.ones(2, dtype=torch.long)), rtol=0, atol=0)
        assert appended.untyped_storage().nbytes() == 2 * 3 * (5 + RING_ROOM) * 4 * 8
        storages.append(appended.untyped_storage().data_ptr())
        ring = appended
    runs = [len(list(group)) for _, group in itertools.groupby(storages)]
    assert runs == [RING_ROOM + 1, RING_ROOM + 1, 1]  # a fresh buffer, then RING_ROOM appends into its room
    for length in (5, 9, 5 + RING_ROOM - 1, 5 + RING_ROOM + 1):
        larger = torch.randn(2, 3, length, 4, dtype=torch.float64)
        as_it_was = larger.clone()
        appended_in_place(larger[:, :, :5], torch.randn(2, 3, 1, 4, dtype=torch.float64))
        appended_in_place(larger[:, :, length - 5 :], torch.randn(2, 3, 1, 4, dtype=torch.float64))
        torch.testing.assert_close(larger, as_it_was, rtol=0, atol=0)


@pytest.mark.parametrize("added", [0, 1, RING_ROOM, RING_ROOM + 1, 11, 12, 40])
def test_a_ring_after_an_extend_holds_no_more_than_its_room(added):
    """``newest`` after ``added`` entries: the last 12 of the joined entries, in storage at most ``RING_ROOM``
    entries larger than the ring (a long prefill's keys are not kept alive by the view of its last ones)."""
    old, real = torch.randn(2, 3, 12, 4), torch.randn(2, 3, 50, 4)
    ring = newest(old, real, torch.full((2,), added))
    torch.testing.assert_close(ring, torch.cat([old, real[:, :, :added]], dim=2)[:, :, -12:], rtol=0, atol=0)
    assert held_bytes([ring]) <= 2 * 3 * (12 + RING_ROOM) * 4 * 4


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_is_as_accurate_as_materialised_scores(seed):
    """The fused form and its sink anchor in bfloat16 (GPU training and serving) against float64 math on the same
    rounded inputs: no worse than materialising the scores in bfloat16, with sinks whose logits dominate."""
    window = SoftmaxWindow(16, 4, 0.125)
    generator = torch.Generator().manual_seed(seed)
    q, k, v, sink_q = (torch.randn(1, heads, 80, 64, generator=generator, dtype=torch.float64)
                       for heads in (4, 2, 2, 4))  # fmt: skip
    q, k, sink_q = 2 * q, 2 * k, 2 * sink_q
    k[:, :, :4] *= 3
    low = [x.bfloat16() for x in (q, k, v, sink_q)]
    exact = window_reference(*[x.double() for x in low[:3]], window, low[3].double())
    fused = (window_attention(*low[:3], window, low[3]).double() - exact).abs().max()
    materialised = (window_reference(*low[:3], window, low[3]).double() - exact).abs().max()
    assert fused <= 1.25 * materialised
