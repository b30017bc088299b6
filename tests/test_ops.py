"""The execution modes of docs/design.md §3 are one math: reference == chunked == recurrent == extend == verify."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linspec.ops import (
    append_tokens,
    chunked_attention,
    empty_state,
    extend_attention,
    recurrent_step,
    reference_attention,
    tree_ancestors,
    verify_attention,
)
from linspec.ops.memory import GlobalMemory
from linspec.ops.verify import TreeLayout, validate_parents

TOL = 1e-10


def make_inputs(batch, heads, kv_heads, length, dim, taps, seed, local_dim=None):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k = randn(batch, heads, length, dim), randn(batch, kv_heads, length, dim)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    v = randn(batch, kv_heads, length, local_dim or dim)
    return q, k, v, randn(heads, taps), torch.tensor(0.8, dtype=torch.float64)


def fresh_state(k, v, group_size, taps):
    batch, kv_heads, _, key_dim = k.shape
    return empty_state(batch, kv_heads, key_dim, v.shape[-1], group_size, taps, k.dtype)


def decode_one_by_one(q, k, v, w, gamma, state, local_kernel="relu2", memory=None):
    outs = []
    for t in range(q.shape[2]):
        out, state = recurrent_step(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], w, gamma, state, local_kernel, memory
        )
        outs.append(out)
    return torch.cat(outs, dim=2), state


def assert_states_equal(a, b):
    for name, tensor in a.tensors().items():
        other = b.tensors()[name]
        assert tensor.shape == other.shape, name
        assert (tensor.double() - other.double()).abs().max().item() <= TOL, name


SHAPES = [  # (batch, heads, kv_heads, length, group, taps)
    (1, 2, 2, 3, 8, 4),  # T < G
    (2, 4, 4, 16, 8, 4),  # T a multiple of G, batch > 1
    (2, 6, 2, 21, 8, 5),  # T not a multiple, GQA
    (3, 4, 1, 37, 4, 9),  # many groups, taps > G, multi-query
    (1, 3, 3, 2, 4, 32),  # taps much longer than the sequence
]


@pytest.mark.parametrize("local_kernel", ["relu2", "identity"])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_and_recurrent_equal_reference(shape, local_kernel):
    batch, heads, kv_heads, length, group, taps = shape
    q, k, v, w, gamma = make_inputs(batch, heads, kv_heads, length, 6, taps, seed=length)
    expected = reference_attention(q, k, v, w, gamma, group, local_kernel)
    chunked = chunked_attention(q, k, v, w, gamma, group, local_kernel)
    recurrent, _ = decode_one_by_one(q, k, v, w, gamma, fresh_state(k, v, group, taps), local_kernel)
    assert (chunked - expected).abs().max().item() < TOL
    assert (recurrent - expected).abs().max().item() < TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_extend_in_pieces_equals_reference_and_decode_state(shape):
    batch, heads, kv_heads, length, group, taps = shape
    q, k, v, w, gamma = make_inputs(batch, heads, kv_heads, length, 5, taps, seed=7 + length)
    expected = reference_attention(q, k, v, w, gamma, group)
    state = fresh_state(k, v, group, taps)
    outs = []
    for lo, hi in [(0, length // 3), (length // 3, length // 3 + 1), (length // 3 + 1, length)]:
        if hi > lo:
            out, state = extend_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], w, gamma, state)
            outs.append(out)
    assert (torch.cat(outs, dim=2) - expected).abs().max().item() < TOL
    _, decoded_state = decode_one_by_one(q, k, v, w, gamma, fresh_state(k, v, group, taps))
    assert_states_equal(state, decoded_state)


def test_padding_never_enters_the_state():
    """Left padding in one row, right padding and a hole in another: outputs and state ignore pad values."""
    group, taps, length = 4, 3, 11
    q, k, v, w, gamma = make_inputs(2, 4, 2, length, 5, taps, seed=3)
    expected = reference_attention(q, k, v, w, gamma, group)
    _, decoded_state = decode_one_by_one(q, k, v, w, gamma, fresh_state(k, v, group, taps))
    columns = [[None, None, *range(length)], [*range(5), None, *range(5, length), None]]
    width = len(columns[0])
    mask = torch.tensor([[c is not None for c in row] for row in columns])

    def lay_out(x):
        garbage = torch.full((x.shape[0], x.shape[1], width, x.shape[3]), 1e3, dtype=x.dtype)  # pads are loud
        for row, cols in enumerate(columns):
            for col, src in enumerate(cols):
                if src is not None:
                    garbage[row, :, col] = x[row, :, src]
        return garbage

    out, state = extend_attention(lay_out(q), lay_out(k), lay_out(v), w, gamma, fresh_state(k, v, group, taps), mask)
    for row, cols in enumerate(columns):
        real = [c for c, src in enumerate(cols) if src is not None]
        assert (out[row, :, real] - expected[row]).abs().max().item() < TOL
        assert out[row, :, [c for c in range(width) if c not in real]].abs().max().item() == 0
    assert_states_equal(state, decoded_state)


def test_rows_at_different_positions_decode_independently():
    group, taps = 4, 3
    q, k, v, w, gamma = make_inputs(2, 2, 1, 9, 4, taps, seed=11)
    state = fresh_state(k, v, group, taps)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    _, state = extend_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], w, gamma, state, mask)
    assert state.position.tolist() == [6, 2]
    out, _ = recurrent_step(q[:, :, 6:7], k[:, :, 6:7], v[:, :, 6:7], w, gamma, state)
    row0 = reference_attention(q[:1, :, :7], k[:1, :, :7], v[:1, :, :7], w, gamma, group)[:, :, -1]
    idx = [0, 1, 6]
    row1 = reference_attention(q[1:, :, idx], k[1:, :, idx], v[1:, :, idx], w, gamma, group)[:, :, -1]
    assert (out[0, :, 0] - row0[0]).abs().max().item() < TOL
    assert (out[1, :, 0] - row1[0]).abs().max().item() < TOL


def test_output_is_causal():
    """Changing tokens after t leaves every output at or before t unchanged (the conv is masked)."""
    q, k, v, w, gamma = make_inputs(1, 2, 2, 20, 4, 6, seed=5)
    base = chunked_attention(q, k, v, w, gamma, 8)
    t = 9
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
    changed = chunked_attention(q2, k2, v2, w, gamma, 8)
    assert (changed[:, :, : t + 1] - base[:, :, : t + 1]).abs().max().item() < TOL
    assert (changed[:, :, t + 1 :] - base[:, :, t + 1 :]).abs().max().item() > 1e-3


# A tree over 9 nodes: two branches from the root, a deeper chain; committed context lengths put paths
# across group boundaries.
TREE = [-1, 0, 0, 1, 1, 2, 3, 6, -1]


@pytest.mark.parametrize("shared_layout", [False, True])
@pytest.mark.parametrize("committed", [0, 1, 5, 6, 7, 14])
def test_verify_rows_equal_sequential_decoding_along_each_path(committed, shared_layout):
    group, taps = 4, 5
    parents = torch.tensor([TREE, TREE])
    nodes = len(TREE)
    q, k, v, w, gamma = make_inputs(2, 4, 2, committed + nodes, 3, taps, seed=committed)
    state = fresh_state(k, v, group, taps)
    if committed:
        _, state = extend_attention(q[:, :, :committed], k[:, :, :committed], v[:, :, :committed], w, gamma, state)
    nq, nk, nv = (x[:, :, committed:] for x in (q, k, v))
    tree = parents
    if shared_layout:  # one layout reused, as by every layer of a model: a first use must not change it
        tree = TreeLayout.of(parents)
        verify_attention(nq.flip(2), nk.flip(2), nv.flip(2), w.flip(1), gamma, state, tree)
    out = verify_attention(nq, nk, nv, w, gamma, state, tree)
    ancestors, depth = tree_ancestors(parents)
    for node in range(nodes):
        path = [i for i in range(nodes) if ancestors[0, node, i]]
        assert len(path) == depth[0, node].item() + 1
        seq_out, _ = decode_one_by_one(nq[:, :, path], nk[:, :, path], nv[:, :, path], w, gamma, state)
        assert (out[:, :, node] - seq_out[:, :, -1]).abs().max().item() < TOL, node


@pytest.mark.parametrize("committed", [2, 7])
def test_commit_of_accepted_path_equals_decoding_it(committed):
    group, taps = 4, 5
    q, k, v, w, gamma = make_inputs(2, 2, 1, committed + len(TREE), 3, taps, seed=40 + committed)
    state = fresh_state(k, v, group, taps)
    _, state = extend_attention(q[:, :, :committed], k[:, :, :committed], v[:, :, :committed], w, gamma, state)
    nq, nk, nv = (x[:, :, committed:] for x in (q, k, v))
    accepted = [[0, 1, 3], [0, 2, 5]]  # different paths per row; pad the shorter selection via the mask
    index = torch.tensor(accepted)
    pick = lambda x: x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))  # noqa: E731
    committed_state = append_tokens(state, pick(nk), pick(nv))
    for row in range(2):
        path = accepted[row]
        row_state = state.map(lambda t, r=row: t[r : r + 1])
        _, expected = decode_one_by_one(
            nq[row : row + 1, :, path], nk[row : row + 1, :, path], nv[row : row + 1, :, path], w, gamma, row_state
        )
        assert_states_equal(committed_state.map(lambda t, r=row: t[r : r + 1]), expected)


def test_invalid_parents_are_rejected():
    with pytest.raises(ValueError, match="earlier node"):
        validate_parents(torch.tensor([[-1, 2, 0]]))


# Length-stable global memories (linspec.ops.memory): every mode carries decay and normalisation, tested equal
# to the reference as the paper's memory is above. "key" divides by q̂ᵀz, so its inputs use positive features.
MEMORIES = ["decay", "mean", "decay+mean", "key", "decay+key"]


def make_memory(name, kv_heads):
    """A memory per name; decays spread per kv head and well below 1 so that a few groups show them."""
    log_decay = torch.linspace(0.45, 0.9, kv_heads, dtype=torch.float64).log() if "decay" in name else None
    norm = name.split("+")[-1] if name.split("+")[-1] in ("mean", "key") else "none"
    return GlobalMemory(log_decay=log_decay, norm=norm)


def memory_inputs(name, batch, heads, kv_heads, length, dim, taps, seed):
    q, k, v, w, gamma = make_inputs(batch, heads, kv_heads, length, dim, taps, seed)
    if "key" in name:  # elu+1 features keep q̂ᵀz > 0
        q, k = F.elu(q * 3) + 1, F.elu(k * 3) + 1
    return q, k, v, w, gamma, make_memory(name, kv_heads)


def memory_state(k, v, group_size, taps, memory):
    batch, kv_heads, _, key_dim = k.shape
    return empty_state(batch, kv_heads, key_dim, v.shape[-1], group_size, taps, k.dtype, key_sum=memory.keeps_key_sum)


def test_the_paper_memory_object_is_the_paper_path():
    q, k, v, w, gamma = make_inputs(2, 4, 2, 21, 6, 5, seed=1)
    assert torch.equal(
        chunked_attention(q, k, v, w, gamma, 4), chunked_attention(q, k, v, w, gamma, 4, "relu2", GlobalMemory())
    )


@pytest.mark.parametrize("memory_name", MEMORIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_memory_chunked_and_recurrent_equal_reference(shape, memory_name):
    batch, heads, kv_heads, length, group, taps = shape
    q, k, v, w, gamma, memory = memory_inputs(memory_name, batch, heads, kv_heads, length, 6, taps, seed=length)
    expected = reference_attention(q, k, v, w, gamma, group, "relu2", memory)
    chunked = chunked_attention(q, k, v, w, gamma, group, "relu2", memory)
    state = memory_state(k, v, group, taps, memory)
    recurrent, _ = decode_one_by_one(q, k, v, w, gamma, state, "relu2", memory)
    assert (chunked - expected).abs().max().item() < TOL
    assert (recurrent - expected).abs().max().item() < TOL


@pytest.mark.parametrize("memory_name", MEMORIES)
def test_memory_changes_the_output_only_past_the_first_group(memory_name):
    """The options act on the global term alone: the first group (empty S) matches the paper exactly."""
    q, k, v, w, gamma, memory = memory_inputs(memory_name, 1, 2, 1, 24, 6, 4, seed=2)
    paper = reference_attention(q, k, v, w, gamma, 8)
    stable = reference_attention(q, k, v, w, gamma, 8, "relu2", memory)
    assert (paper[:, :, :8] - stable[:, :, :8]).abs().max().item() < TOL
    assert (paper[:, :, 8:] - stable[:, :, 8:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("memory_name", MEMORIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_memory_extend_in_pieces_equals_reference_and_decode_state(shape, memory_name):
    batch, heads, kv_heads, length, group, taps = shape
    q, k, v, w, gamma, memory = memory_inputs(memory_name, batch, heads, kv_heads, length, 5, taps, seed=7 + length)
    expected = reference_attention(q, k, v, w, gamma, group, "relu2", memory)
    state = empty_state(batch, kv_heads, 5, 5, group, taps, q.dtype)  # no z yet: read as zeros
    outs = []
    for lo, hi in [(0, length // 3), (length // 3, length // 3 + 1), (length // 3 + 1, length)]:
        if hi > lo:
            piece = (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], w, gamma, state)
            out, state = extend_attention(*piece, None, "relu2", memory)
            outs.append(out)
    assert (torch.cat(outs, dim=2) - expected).abs().max().item() < TOL
    _, decoded_state = decode_one_by_one(q, k, v, w, gamma, memory_state(k, v, group, taps, memory), "relu2", memory)
    assert_states_equal(state, decoded_state)
    assert (state.key_sum is not None) == memory.keeps_key_sum


@pytest.mark.parametrize("memory_name", MEMORIES)
def test_memory_padding_never_enters_the_state(memory_name):
    group, taps, length = 4, 3, 11
    q, k, v, w, gamma, memory = memory_inputs(memory_name, 2, 4, 2, length, 5, taps, seed=3)
    expected = reference_attention(q, k, v, w, gamma, group, "relu2", memory)
    _, decoded_state = decode_one_by_one(q, k, v, w, gamma, memory_state(k, v, group, taps, memory), "relu2", memory)
    columns = [[None, None, *range(length)], [*range(5), None, *range(5, length), None]]
    mask = torch.tensor([[c is not None for c in row] for row in columns])

    def lay_out(x):
        out = torch.full((x.shape[0], x.shape[1], len(columns[0]), x.shape[3]), 1e3, dtype=x.dtype)
        for row, cols in enumerate(columns):
            for col, src in enumerate(cols):
                if src is not None:
                    out[row, :, col] = x[row, :, src]
        return out

    state = memory_state(k, v, group, taps, memory)
    out, state = extend_attention(lay_out(q), lay_out(k), lay_out(v), w, gamma, state, mask, "relu2", memory)
    for row, cols in enumerate(columns):
        real = [c for c, src in enumerate(cols) if src is not None]
        assert (out[row, :, real] - expected[row]).abs().max().item() < TOL
    assert_states_equal(state, decoded_state)


@pytest.mark.parametrize("memory_name", MEMORIES)
@pytest.mark.parametrize(("group", "committed"), [(4, 0), (4, 3), (4, 7), (2, 1), (2, 4), (3, 5)])
def test_memory_verify_rows_equal_sequential_decoding_along_each_path(memory_name, group, committed):
    """Group 2 or 3 with depth-4 paths: a path crosses one, two or more group boundaries."""
    taps = 5
    parents = torch.tensor([TREE, TREE])
    nodes = len(TREE)
    q, k, v, w, gamma, memory = memory_inputs(memory_name, 2, 4, 2, committed + nodes, 3, taps, seed=committed)
    state = memory_state(k, v, group, taps, memory)
    if committed:
        prefix = (q[:, :, :committed], k[:, :, :committed], v[:, :, :committed], w, gamma, state)
        _, state = extend_attention(*prefix, None, "relu2", memory)
    nq, nk, nv = (x[:, :, committed:] for x in (q, k, v))
    out = verify_attention(nq, nk, nv, w, gamma, state, parents, "relu2", memory)
    ancestors, _ = tree_ancestors(parents)
    for node in range(nodes):
        path = [i for i in range(nodes) if ancestors[0, node, i]]
        seq_out, _ = decode_one_by_one(nq[:, :, path], nk[:, :, path], nv[:, :, path], w, gamma, state, "relu2", memory)
        assert (out[:, :, node] - seq_out[:, :, -1]).abs().max().item() < TOL, node


@pytest.mark.parametrize("memory_name", MEMORIES)
@pytest.mark.parametrize("committed", [2, 7])
def test_memory_commit_of_accepted_path_equals_decoding_it(memory_name, committed):
    group, taps = 2, 5
    q, k, v, w, gamma, memory = memory_inputs(memory_name, 2, 2, 1, committed + len(TREE), 3, taps, seed=committed)
    state = memory_state(k, v, group, taps, memory)
    prefix = (q[:, :, :committed], k[:, :, :committed], v[:, :, :committed], w, gamma, state)
    _, state = extend_attention(*prefix, None, "relu2", memory)
    nq, nk, nv = (x[:, :, committed:] for x in (q, k, v))
    accepted = [[0, 1, 3, 6, 7], [0, 2, 5, 0, 0]]  # row 1 accepts three: the rest is masked
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    index = torch.tensor(accepted)
    pick = lambda x: x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))  # noqa: E731
    committed_state = append_tokens(state, pick(nk), pick(nv), mask, memory)
    for row in range(2):
        path = accepted[row][: int(mask[row].sum())]
        row_state = state.map(lambda t, r=row: t[r : r + 1])
        sel = lambda x, r=row, p=path: x[r : r + 1, :, p]  # noqa: E731
        _, expected = decode_one_by_one(sel(nq), sel(nk), sel(nv), w, gamma, row_state, "relu2", memory)
        assert_states_equal(committed_state.map(lambda t, r=row: t[r : r + 1]), expected)


@pytest.mark.parametrize("memory_name", MEMORIES)
def test_memory_gradients_of_chunked_equal_reference(memory_name):
    """Autograd through the chunked form (decay scan, normaliser) equals autograd through the quadratic spec,
    for every input and for the decay logits that parametrise λ = sigmoid(a)."""
    q, k, v, w, gamma, memory = memory_inputs(memory_name, 2, 4, 2, 19, 4, 5, seed=13)
    logits = torch.tensor([0.3, 1.7], dtype=torch.float64, requires_grad=True)
    inputs = [x.requires_grad_() for x in (q, k, v, w, gamma)]

    def run(fn):
        log_decay = F.logsigmoid(logits) if memory.log_decay is not None else None
        out = fn(*inputs, 4, "relu2", GlobalMemory(log_decay, memory.norm))
        probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        return torch.autograd.grad((out * probe).sum(), [*inputs, logits], allow_unused=True)

    for got, want in zip(run(chunked_attention), run(reference_attention), strict=True):
        if want is None:
            assert got is None
            continue
        assert (got - want).abs().max().item() < TOL * max(1.0, want.abs().max().item())
    if memory.log_decay is not None:
        assert run(chunked_attention)[-1].abs().max() > 1e-6


def test_decay_logit_gradcheck_through_chunked_and_recurrent():
    q, k, v, w, gamma, _ = memory_inputs("decay+mean", 1, 2, 1, 9, 3, 2, seed=4)

    def chunked(logit):
        return chunked_attention(q, k, v, w, gamma, 2, "relu2", GlobalMemory(F.logsigmoid(logit), "mean"))

    def recurrent(logit):
        memory = GlobalMemory(F.logsigmoid(logit), "mean")
        return decode_one_by_one(q, k, v, w, gamma, memory_state(k, v, 2, 2, memory), "relu2", memory)[0]

    logit = torch.tensor([1.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(chunked, (logit,))
    assert torch.autograd.gradcheck(recurrent, (logit,))


# --- the layout of the package: reference and PyTorch forms, the kernels, one dispatch between them -------------------
PYTORCH_FORMS = ["linspec.ops.reference", "linspec.ops.chunked", "linspec.ops.conv", "linspec.ops.recurrent",
                 "linspec.ops.verify"]  # fmt: skip
# What the kernels may import from the rest of ops: the pieces every mode shares, never a form or the dispatch.
KERNEL_LEAVES = {"linspec.ops.state", "linspec.ops.memory", "linspec.ops.kernel_fn"}


def test_the_pytorch_forms_and_the_kernels_never_import_the_dispatch_or_each_other():
    """Every edge between PyTorch and Triton goes through ``linspec.ops.backend``, so neither side can call the
    other behind the dispatch's back (the import graph is ``tests/test_architecture.py``'s, which also counts
    imports inside functions)."""
    from test_architecture import GRAPH

    for module in PYTORCH_FORMS:
        reached = {t for t in GRAPH[module] if t == "linspec.ops.backend" or t.startswith("linspec.ops.triton")}
        assert not reached, f"{module} imports {sorted(reached)}"
    kernels = [m for m in GRAPH if m.startswith("linspec.ops.triton.")]
    assert "linspec.ops.triton.chunked" in kernels
    for module in kernels:
        outside = {t for t in GRAPH[module] if not t.startswith("linspec.ops.triton")} - KERNEL_LEAVES
        assert not outside, f"{module} imports {sorted(outside)}"


def test_no_ops_module_imports_by_name_at_run_time():
    """``importlib.import_module`` and ``__import__`` add edges the import graph cannot read."""
    import ast
    from pathlib import Path

    import linspec.ops

    for path in Path(linspec.ops.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                assert name not in ("import_module", "__import__"), f"{path}:{node.lineno}"
