"""The kernels on the recommended memory: a per-kv-head decay folded once per group and the "mean" normaliser.

Every mode (chunked forward and backward, grouped terms on a state, extend with padding, decode, tree verify) runs
through the public ops under ``backend("triton")`` (interpreted on CPU, float32) and is compared with the float64
PyTorch ops and the quadratic reference. The memory's two easy mistakes — a decay applied once too often (or too
rarely) and a normaliser that counts one group too many (or too few) — are built here from the definition
(``memory_global``) and must land far from the kernels, which must land on the right variant.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch
from kernel_cases import TOL, assert_close, assert_states_close, fresh_state, make_inputs, max_error

import linspec.ops.triton.chunked
import linspec.ops.triton.conv
import linspec.ops.triton.recurrent
import linspec.ops.triton.verify
from linspec.ops import chunked_attention, extend_attention, recurrent_step, reference_attention, verify_attention
from linspec.ops.backend import KernelFallbackWarning, backend, grouped_terms
from linspec.ops.memory import GlobalMemory
from linspec.ops.triton.capabilities import OPS

LOG_DECAY = [-0.15, -0.6]  # two kv heads; strong enough that one fold more or less shows
MEMORIES = {  # name: (decayed, norm)
    "decay+mean": (True, "mean"),  # the stable and window presets
    "decay": (True, "none"),
    "mean": (False, "mean"),
}


def memory_of(kind: str, log_decay: torch.Tensor) -> GlobalMemory:
    decayed, norm = MEMORIES[kind]
    return GlobalMemory(log_decay=log_decay if decayed else None, norm=norm)


def memory_global(
    q, k, v, group_size, memory, first_group=None, initial_kv=None, extra_folds=0, count_shift=0
) -> torch.Tensor:
    """The global term ``[B, H, T, Dv]`` in float64 from its definition, with the two mistakes as knobs.

    Source ``s`` is weighted ``λ^(grp(t) − 1 − grp(s) + extra_folds)``, the initial S ``λ^(grp(t) + extra_folds)``;
    "mean" divides by ``n = G Σ_{j < first + grp(t) + count_shift} λ^j`` + eps. The right memory has both knobs 0.
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, length, _ = q.shape
    repeats = heads // k.shape[1]
    keys, values = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1)
    group = torch.arange(length) // group_size
    age = group[:, None] - 1 - group[None, :]  # (T, T): folds since the source's group ended
    log_decay = torch.zeros(k.shape[1], dtype=torch.float64)
    if memory.log_decay is not None:
        log_decay = memory.log_decay.detach().double()
    per_head = log_decay.repeat_interleave(repeats).view(heads, 1, 1)
    weights = (age >= 0) * torch.exp(per_head * (age + extra_folds))  # (H, T, T)
    out = (weights * (q @ keys.transpose(-1, -2))) @ values
    if initial_kv is not None:
        carried = torch.exp(per_head.view(heads, 1) * (group + extra_folds)).unsqueeze(-1)  # (H, T, 1)
        out = out + carried * (q @ initial_kv.double().repeat_interleave(repeats, 1))
    if memory.norm == "mean":
        first = torch.zeros(batch, dtype=torch.long) if first_group is None else first_group
        count = (first[:, None] + group[None, :] + count_shift).clamp(min=0)  # (B, T)
        powers = torch.exp(per_head.view(1, heads, 1, 1) * torch.arange(int(count.max()) + 1))  # (1, H, 1, J)
        below = torch.arange(powers.shape[-1]) < count[:, None, :, None]  # (B, 1, T, J): j < count
        folded = group_size * (powers * below).sum(-1)  # (B, H, T)
        out = out / (folded.unsqueeze(-1) + memory.eps)
    return out


def assert_only_the_right_memory(actual, right, wrong_variants: dict[str, torch.Tensor], what: str) -> None:
    """``actual`` equals ``right`` within float32 tolerance and is far (100× that) from every wrong variant."""
    assert_close(actual, right.float() if right.dtype != torch.float32 else right, what)
    scale = max(1.0, right.abs().max().item())
    for name, wrong in wrong_variants.items():
        assert max_error(wrong, right) > 100 * TOL * scale, f"{what}: the {name} variant does not differ here"
        assert max_error(actual, wrong) > 100 * TOL * scale, f"{what}: the kernels compute the {name} variant"


MISTAKES = {  # name: knobs of memory_global
    "decayed once too often": {"extra_folds": 1},
    "decayed once too rarely": {"extra_folds": -1},
    "normaliser one group ahead": {"count_shift": 1},
    "normaliser one group behind": {"count_shift": -1},
}


def mistakes_for(kind: str) -> dict[str, dict[str, int]]:
    decayed, norm = MEMORIES[kind]
    return {
        name: knobs
        for name, knobs in MISTAKES.items()
        if (decayed or "extra_folds" not in knobs) and (norm == "mean" or "count_shift" not in knobs)
    }


# (batch, heads, kv_heads, length, head_dim, group, taps): odd lengths, T < G, GQA, a partial last group
SHAPES = [
    (1, 2, 2, 11, 16, 16, 4),
    (2, 4, 2, 37, 16, 8, 5),
    (1, 4, 2, 45, 16, 16, 9),
]


@pytest.mark.parametrize("local_kernel", ["relu2", "none"])
@pytest.mark.parametrize("kind", sorted(MEMORIES))
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_memory_forward_and_gradients(shape, kind, local_kernel):
    """Output against the quadratic reference; dq, dk, dv, dw, dγ and d log λ against float64 autograd of the
    PyTorch chunked op. ``local_kernel`` "none" is the window preset's grouped term (memory and conv only)."""
    batch, heads, kv_heads, length, dim, group, taps = shape
    seed = zlib.crc32(repr((shape, kind, local_kernel)).encode())
    q, k, v, w, gamma = make_inputs(batch, heads, kv_heads, length, dim, taps, seed=seed)
    log_decay = torch.tensor(LOG_DECAY[:kv_heads])
    inputs = [x.requires_grad_() for x in (q, k, v, w, gamma, log_decay)]
    grad_out = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(seed))
    with backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)  # it must run on the kernels
        out = chunked_attention(*inputs[:5], group, local_kernel, memory_of(kind, inputs[5]))
    decayed = MEMORIES[kind][0]
    wanted = inputs if decayed else inputs[:5]
    grads = torch.autograd.grad(out, wanted, grad_out)

    exact = [x.detach().double().requires_grad_() for x in inputs]
    exact_memory = memory_of(kind, exact[5])
    assert_close(out, reference_attention(*exact[:5], group, local_kernel, exact_memory), "output")
    with backend("torch"):
        expected = chunked_attention(*exact[:5], group, local_kernel, exact_memory)
    expected_grads = torch.autograd.grad(expected, exact if decayed else exact[:5], grad_out.double())
    names = ["q", "k", "v", "conv_weight", "gamma", "log_decay"]
    for name, grad, expected_grad in zip(names, grads, expected_grads, strict=False):
        # one group: nothing in the memory, and without a local term nothing reads q or k
        unread = ("gamma", "log_decay") + (("q", "k") if local_kernel == "none" else ())
        assert expected_grad.abs().max() > 0 or (length <= group and name in unread), name  # it means something
        assert_close(grad, expected_grad, f"d{name}")


def test_chunked_memory_with_per_row_decays_and_several_head_dim_tiles(monkeypatch):
    """A ``(B, Hkv)`` decay (rows with their own λ, as the speculative commit stacks layers), head dims over
    several tiles and Dv != Dk: forward and every gradient, log λ's per row."""
    monkeypatch.setattr(linspec.ops.triton.utils, "MAX_BLOCK", 16)
    q, k, v, w, gamma = make_inputs(2, 2, 1, 40, 32, 5, seed=21, value_dim=48)
    log_decay = torch.tensor([[-0.05], [-0.9]])
    inputs = [x.requires_grad_() for x in (q, k, v, w, gamma, log_decay)]
    grad_out = torch.randn(2, 2, 40, 48, generator=torch.Generator().manual_seed(21))
    with backend("triton"):
        out = chunked_attention(*inputs[:5], 16, "none", GlobalMemory(inputs[5], "mean"))
    grads = torch.autograd.grad(out, inputs, grad_out)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    with backend("torch"):
        expected = chunked_attention(*exact[:5], 16, "none", GlobalMemory(exact[5], "mean"))
    assert_close(out, expected, "output")
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, exact, grad_out.double()), strict=True):
        assert_close(grad, expected_grad, "grad")


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_chunked_memory_is_the_right_one_and_not_a_near_miss(kind):
    """The training output, minus everything but γ·global, is the right memory and none of its near misses."""
    q, k, v, w, gamma = make_inputs(2, 4, 2, 45, 16, 3, seed=22)
    memory = memory_of(kind, torch.tensor(LOG_DECAY))
    with backend("triton"):
        out = chunked_attention(q, k, v, w, gamma, 8, "none", memory)
    plain_rest = reference_attention(q.double(), k.double(), v.double(), w.double(), torch.tensor(0.0), 8, "none")
    actual = (out.double() - plain_rest).float()  # γ·global of the kernels (the conv is memory-free)
    right = gamma * memory_global(q, k, v, 8, memory)
    wrong = {name: gamma * memory_global(q, k, v, 8, memory, **knobs) for name, knobs in mistakes_for(kind).items()}
    assert_only_the_right_memory(actual, right, wrong, "chunked")


@pytest.mark.parametrize("kind", sorted(MEMORIES))
def test_grouped_terms_on_a_state_count_the_groups_before_it(kind):
    """Prefill on a state: an initial S decayed once per group, and per-row ``first_group`` (rows at different
    depths) setting the normaliser's count; the state after every group as well."""
    q, k, v, _, _ = make_inputs(2, 4, 2, 29, 16, 3, seed=23)
    initial_kv = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(23))
    first_group = torch.tensor([3, 7])
    memory = memory_of(kind, torch.tensor(LOG_DECAY))
    with backend("triton"):
        local, global_term, kv_through, key_sum = grouped_terms(
            q, k, v, 8, "relu2", initial_kv, memory, first_group=first_group
        )
    exact_memory = memory_of(kind, torch.tensor(LOG_DECAY, dtype=torch.float64))
    with backend("torch"):
        expected = grouped_terms(
            q.double(), k.double(), v.double(), 8, "relu2", initial_kv.double(), exact_memory, first_group=first_group
        )
    assert key_sum is None and expected[3] is None
    for name, a, e in zip(["local", "global", "kv_through"], (local, global_term, kv_through), expected, strict=False):
        assert_close(a, e, name)
    right = memory_global(q, k, v, 8, memory, first_group, initial_kv)
    wrong = {
        name: memory_global(q, k, v, 8, memory, first_group, initial_kv, **knobs)
        for name, knobs in mistakes_for(kind).items()
    }
    assert_only_the_right_memory(global_term, right, wrong, "grouped global")


@pytest.mark.parametrize("local_kernel", ["relu2", "none"])
def test_extend_with_padding_and_rows_of_different_lengths(local_kernel):
    """Two prefills on a state: left padding, padding in the middle, rows with different real lengths (one row
    with none at all in the second call) — outputs and the state after, against float64 PyTorch."""
    group, taps = 8, 5
    q, k, v, w, gamma = make_inputs(3, 4, 2, 31, 16, taps, seed=24)
    first = torch.ones(3, 14, dtype=torch.bool)
    first[0, :5] = False  # left padding
    first[1, 3:6] = False  # a hole
    second = torch.ones(3, 17, dtype=torch.bool)
    second[1, 11:] = False  # right padding: a shorter row
    second[2] = False  # a row with nothing to add
    results = {}
    for name, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        x = [t.to(dtype) for t in (q, k, v, w, gamma)]
        memory = GlobalMemory(torch.tensor(LOG_DECAY, dtype=dtype), "mean")
        with backend(name):
            state = fresh_state(x[1], x[2], group, taps)
            prefill, state = extend_attention(
                *(t[:, :, :14] for t in x[:3]), *x[3:], state, first, local_kernel, memory
            )
            more, state = extend_attention(*(t[:, :, 14:] for t in x[:3]), *x[3:], state, second, local_kernel, memory)
        results[name] = (prefill, more, state)
    assert_close(results["triton"][0], results["torch"][0], "first prefill")
    assert_close(results["triton"][1], results["torch"][1], "second prefill")
    assert_states_close(results["triton"][2], results["torch"][2], "state")
    assert results["triton"][2].position.tolist() == [9 + 17, 11 + 11, 14]


@pytest.mark.parametrize("kind", sorted(MEMORIES))
@pytest.mark.parametrize("local_kernel", ["relu2", "none"])
def test_decode_folds_each_completed_group_once(kind, local_kernel):
    """Token-by-token decode across two group boundaries from rows at different positions (one left-padded):
    every output and state against float64 PyTorch, and the decoded outputs on the right memory only."""
    group, taps, prompt, steps = 4, 3, 6, 7
    q, k, v, w, gamma = make_inputs(2, 4, 2, prompt + steps, 16, taps, seed=25)
    mask = torch.ones(2, prompt, dtype=torch.bool)
    mask[1, :3] = False  # row 1 starts 3 tokens later
    memory = memory_of(kind, torch.tensor(LOG_DECAY))
    exact_memory = memory_of(kind, torch.tensor(LOG_DECAY, dtype=torch.float64))
    x = (q, k, v)
    start = fresh_state(k, v, group, taps)
    _, state = extend_attention(*(t[:, :, :prompt] for t in x), w, gamma, start, mask, local_kernel, memory)
    exact_state = state.map(lambda t: t.double() if t.is_floating_point() else t)
    outs = []
    for t in range(prompt, prompt + steps):
        token = [a[:, :, t : t + 1] for a in x]
        with backend("triton"):
            out, state = recurrent_step(*token, w, gamma, state, local_kernel, memory)
        with backend("torch"):
            exact = [a.double() for a in (*token, w, gamma)]
            expected, exact_state = recurrent_step(*exact, exact_state, local_kernel, exact_memory)
        assert_close(out, expected, f"step {t}")
        assert_states_close(state, exact_state, f"step {t}")
        outs.append(out)
    assert state.position.tolist() == [prompt + steps, prompt - 3 + steps]
    # Row 0 decodes from position 6 as the full sequence would: its γ·global is the right memory's.
    decoded = torch.cat(outs, dim=2)[:1]
    rest = reference_attention(*(a[:1].double() for a in x), w.double(), torch.tensor(0.0), group, local_kernel)
    actual = (decoded.double() - rest[:, :, prompt:]).float()

    def tail(global_term: torch.Tensor) -> torch.Tensor:
        return gamma * global_term[:, :, prompt:]

    right = tail(memory_global(*(a[:1] for a in x), group, memory))
    row = [a[:1] for a in x]
    wrong = {name: tail(memory_global(*row, group, memory, **knobs)) for name, knobs in mistakes_for(kind).items()}
    assert_only_the_right_memory(actual, right, wrong, "decode")


@pytest.mark.parametrize("local_kernel", ["relu2", "none"])
@pytest.mark.parametrize("committed", [5, 8])
def test_verify_trees_across_group_boundaries(committed, local_kernel):
    """A deep tree and a bushy one from rows at different positions (one left-padded), paths crossing one and
    two group boundaries: each node's memory is folded by its own path's groups."""
    group, taps = 4, 3
    tree = [-1, 0, 1, 2, 3, 4, 1, 6, -1]
    parents = torch.tensor([tree, [-1] + [0] * (len(tree) - 1)])
    q, k, v, w, gamma = make_inputs(2, 4, 2, committed + len(tree), 16, taps, seed=26 + committed)
    mask = torch.ones(2, committed, dtype=torch.bool)
    mask[1, :2] = False
    for kind in sorted(MEMORIES):
        results = {}
        for name, dtype in (("triton", torch.float32), ("torch", torch.float64)):
            x = [t.to(dtype) for t in (q, k, v, w, gamma)]
            memory = memory_of(kind, torch.tensor(LOG_DECAY, dtype=dtype))
            with backend("torch"):
                prompt = (*(t[:, :, :committed] for t in x[:3]), *x[3:])
                _, state = extend_attention(*prompt, fresh_state(x[1], x[2], group, taps), mask, local_kernel, memory)
            with backend(name):
                nodes = (*(t[:, :, committed:] for t in x[:3]), *x[3:], state, parents)
                results[name] = verify_attention(*nodes, local_kernel, memory)
        assert_close(results["triton"], results["torch"], f"verify {kind}")


def test_every_mode_of_the_window_preset_enters_its_kernel(monkeypatch):
    """The window preset's grouped term (decayed, mean-normalised memory; no in-group term) reaches a kernel in
    every mode, without a fallback warning: entry points are wrapped to record that they ran."""
    entered = []

    def recording(kernel, name):
        def run(*args, **kwargs):
            entered.append(name)
            return kernel(*args, **kwargs)

        return run

    entry_points = [
        (linspec.ops.triton.chunked, "chunked_attention"),
        (linspec.ops.triton.chunked, "grouped_terms"),
        (linspec.ops.triton.conv, "causal_depthwise_conv"),
        (linspec.ops.triton.recurrent, "recurrent_step"),
        (linspec.ops.triton.verify, "verify_attention"),
    ]
    for module, name in entry_points:
        monkeypatch.setattr(module, name, recording(getattr(module, name), name))
    q, k, v, w, gamma = make_inputs(1, 2, 1, 12, 16, 3, seed=27)
    memory = GlobalMemory(torch.tensor([-0.2]), "mean")
    with backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        chunked_attention(q, k, v, w, gamma, 4, "none", memory)
        _, state = extend_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], w, gamma, fresh_state(k, v, 4, 3), None,
                                    "none", memory)  # fmt: skip
        recurrent_step(q[:, :, 6:7], k[:, :, 6:7], v[:, :, 6:7], w, gamma, state, "none", memory)
        tree = torch.tensor([[-1, 0, 0]])
        verify_attention(q[:, :, 6:9], k[:, :, 6:9], v[:, :, 6:9], w, gamma, state, tree, "none", memory)
    assert sorted(set(entered)) == sorted(set(OPS) - {"run_readout"})  # the far memory's: its own test


def test_a_graph_through_log_decay_keeps_autograd_by_handing_decode_to_pytorch():
    """The forward-only kernels cannot carry a gradient to λ: a decode call whose decay records a graph runs on
    PyTorch, says so, and keeps that gradient (at position 9 of G = 4, S and the count both depend on λ)."""
    q, k, v, w, gamma = make_inputs(1, 2, 2, 10, 16, 3, seed=28)
    log_decay = torch.tensor(LOG_DECAY, requires_grad=True)
    with torch.no_grad():
        _, state = extend_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], w, gamma, fresh_state(k, v, 4, 3), None,
                                    "relu2", GlobalMemory(log_decay, "mean"))  # fmt: skip
    token = (q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], w, gamma, state, "relu2")
    with backend("triton"), pytest.warns(KernelFallbackWarning, match="recurrent_step kernel is forward-only"):
        out, _ = recurrent_step(*token, GlobalMemory(log_decay, "mean"))
    (grad,) = torch.autograd.grad(out.sum(), log_decay)
    assert grad.abs().min() > 0
    with pytest.raises(ValueError, match="forward-only"):
        linspec.ops.triton.recurrent.recurrent_step(*token, GlobalMemory(log_decay))
