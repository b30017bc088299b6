"""Attention transfer for the far memory: the far attention KL against the spec's own rows, its gradients, the
training-time window override, the recipe keys and a tiny run with them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_far_memory import memory_model, random_ids

from linspec.errors import LinspecError
from linspec.models import hf
from linspec.models.attention import LinspecAttention
from linspec.models.context import window_size, window_size_override
from linspec.ops.far_memory import far_memory_reference
from linspec.train.far_attention import far_attention_kl
from linspec.train.recipe import load_recipe
from linspec.train.run import train
from linspec.train.stages.attention_transfer import drawn_window_size
from linspec.train.tiny import make_tiny_base
from linspec.train.transfer import AttentionTransfer, far_attention_loss


def layer_calls(model, ids: torch.Tensor) -> list[tuple]:
    """``(module, hidden_states, position_embeddings)`` of every linear layer in one forward of ``ids``."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((module, *hf.attention_call_inputs(args, kwargs)))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in model.linspec_modules()]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def brute_force_kl(module, hidden: torch.Tensor, positions) -> torch.Tensor:
    """The mean KL over rows with an evicted token, from whole rows: the parent's causal softmax, and the layer's
    row as ``far_memory_reference`` defines it (read out with one-hot values, so the output *is* the row)."""
    q, k, _, sink_q = module.project(hidden, positions)
    window = module.softmax_window()
    memory = next(t for t in module.terms if t.name == "window").far_memory(q.dtype)
    batch, kv_heads, length, _ = k.shape
    one_hot = torch.eye(length, dtype=q.dtype).expand(batch, kv_heads, length, length)
    layer = far_memory_reference(q, k, one_hot, window, memory, sink_q)
    keys = k.repeat_interleave(q.shape[1] // kv_heads, dim=1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    parent = torch.softmax((q @ keys.transpose(-1, -2) * window.scale).masked_fill(~causal, float("-inf")), dim=-1)
    ratio = torch.where(causal, torch.log(parent) - torch.log(layer), 0.0)
    per_row = (parent * ratio).sum(dim=-1)  # (B, H, T)
    return per_row[:, :, window.size + window.sinks :].mean()


@pytest.mark.parametrize(("sink_positions", "decayed"), [("adjacent", False), ("absolute", False), ("adjacent", True)])
def test_the_loss_is_the_kl_of_the_spec_rows_over_rows_past_the_window(sink_positions, decayed):
    model = memory_model(sink_positions=sink_positions, memory_distance_decay=decayed)
    calls = layer_calls(model, random_ids(2, 23))
    for module, hidden, positions in calls:
        expected = brute_force_kl(module, hidden, positions)
        assert expected > 1e-4  # the memory is not the parent: there is something to learn
        assert far_attention_loss(module, hidden, positions).item() == pytest.approx(expected.item(), rel=1e-9)
    module, hidden, positions = calls[0]
    q, k, _, sink_q = module.project(hidden, positions)
    memory = next(t for t in module.terms if t.name == "window").far_memory(q.dtype)
    blocked = [far_attention_kl(q, k, module.softmax_window(), memory, sink_q, block=b) for b in (1, 5, 64)]
    assert blocked[0].item() == pytest.approx(blocked[1].item(), rel=1e-12)
    assert blocked[0].item() == pytest.approx(blocked[2].item(), rel=1e-12)


def test_nothing_to_learn_before_the_first_eviction():
    model = memory_model()
    window = model.linspec_modules()[0].softmax_window()
    (module, hidden, positions), *_ = layer_calls(model, random_ids(1, window.size + window.sinks))
    assert far_attention_loss(module, hidden, positions) is None


def test_gradients_reach_both_maps_the_bias_and_the_distance_exponent():
    model = memory_model(memory_distance_decay=True)
    module, hidden, positions = layer_calls(model, random_ids(2, 23))[0]
    far_attention_loss(module, hidden, positions).backward()
    for name in ("memory_feature_map_q", "memory_feature_map_k", "memory_bias", "memory_distance_exponent"):
        grad = getattr(module, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert module.q_proj.weight.grad is None  # the parent's projections stay out of it


def test_the_kl_alone_runs_only_the_parent_attention_and_records_the_same_losses(monkeypatch):
    """With the far attention KL alone no layer output is read, so the layers' own attention is not run; the
    losses are those of the path that runs it."""
    model = memory_model(memory_distance_decay=True)
    ids = random_ids(2, 29)
    own_calls = []
    forward = LinspecAttention.forward
    monkeypatch.setattr(
        LinspecAttention, "forward", lambda self, *a, **k: own_calls.append(1) or forward(self, *a, **k)
    )

    def losses(output_mse_weight: float) -> list[float]:
        with AttentionTransfer(model, "far_attention", output_mse_weight) as transfer, torch.no_grad():
            model(input_ids=ids, use_cache=False)
            return [loss.item() for loss in transfer.losses]

    parent_only = losses(0.0)
    assert parent_only and not own_calls
    with_outputs = losses(1e-300)  # reads the layers' outputs; adds nothing a float64 sum can see
    assert len(own_calls) == len(model.linspec_modules())
    assert parent_only == pytest.approx(with_outputs, rel=1e-12)
    assert "forward" not in model.linspec_modules()[0].__dict__  # the class's forward is back


def test_a_window_override_changes_only_positions_past_it_and_is_restored():
    model = memory_model(seed=5)
    module = model.linspec_modules()[0]
    own = module.softmax_window().size
    ids = random_ids(1, 20)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        with window_size(2):
            assert window_size_override() == 2 and module.softmax_window().size == 2
            narrow = model(input_ids=ids, use_cache=False).logits
        assert window_size_override() is None and module.softmax_window().size == own
        again = model(input_ids=ids, use_cache=False).logits
    sinks = module.softmax_window().sinks
    unchanged = 2 + sinks  # before it, a query sees the same tokens with either window
    assert torch.equal(plain[:, :unchanged], narrow[:, :unchanged])
    assert (plain[:, unchanged:] - narrow[:, unchanged:]).abs().amax(dim=-1).min() > 1e-6
    assert torch.equal(plain, again)
    with pytest.raises(ValueError), window_size(0):
        pass


def test_window_sizes_are_drawn_from_the_seed_and_the_step():
    sizes = [2, 3, 4]
    draws = [drawn_window_size(sizes, 7, step) for step in range(40)]
    assert draws == [drawn_window_size(sizes, 7, step) for step in range(40)]
    assert set(draws) == set(sizes)
    assert draws != [drawn_window_size(sizes, 8, step) for step in range(40)]
    assert drawn_window_size([], 7, 3) is None


# --- recipes and a tiny run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(autouse=True)
def linspec_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))


def far_recipe(tmp_path, tiny_base, **stage_changes):
    stage = {
        "kind": "attention_transfer",
        "steps": 4,
        "batch_size": 2,
        "loss": "far_attention",
        "window_sizes": [4, 6],
        "trainable": ["far_memory"],
        "optimizer": {"lr": 0.05, "memory_bias_lr": 0.2},
        **stage_changes,
    }
    data = {
        "base": str(tiny_base),
        "output": str(tmp_path / "run"),
        "conversion": {"preset": "window-hedgehog", "local_window": 8, "sink_tokens": 2},
        "data": {"train": ["builtin:sample"], "eval": None, "eval_fraction": 0.25, "seq_len": 32},
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"baselines": False},
        "stages": [stage],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("stages.0.loss=far_attention_x", r"stages\[0\].loss: expected one of"),
        ("stages.0.window_sizes=[4, 9]", r"stages\[0\].window_sizes\[1\]: must be in 1..8"),
        ("stages.0.window_sizes=[0]", r"stages\[0\].window_sizes\[0\]: must be in 1..8"),
        ("stages.0.window_sizes=4", r"stages\[0\].window_sizes: expected a list"),
        ("stages.0.output_mse_weight=-1", r"stages\[0\].output_mse_weight"),
        ("data.seq_len=8", "never leave a window of 6 \\+ 2 sinks"),
        ("stages.0.optimizer.memory_bias_lr=0", r"stages\[0\].optimizer.memory_bias_lr"),
        ("conversion.preset=window", "needs a far memory"),
        ("conversion={preset: paper}", "need a softmax window"),
    ],
)
def test_recipe_keys_are_checked(tmp_path, tiny_base, change, message):
    with pytest.raises(LinspecError, match=message):
        load_recipe(far_recipe(tmp_path, tiny_base), [change])


def test_output_mse_weight_is_only_for_the_far_attention_loss(tmp_path, tiny_base):
    path = far_recipe(tmp_path, tiny_base, loss="mse", output_mse_weight=0.5)
    with pytest.raises(LinspecError, match="only adds to loss far_attention"):
        load_recipe(path)


def test_a_tiny_far_attention_run_trains_the_memory_and_draws_its_windows(tmp_path, tiny_base):
    recipe = load_recipe(far_recipe(tmp_path, tiny_base, steps=6, output_mse_weight=0.5))
    train(recipe)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == 6 and all(r["loss"] > 0 for r in steps)
    assert {r["window_size"] for r in steps} <= {4, 6}
    assert [r["window_size"] for r in steps] == [drawn_window_size([4, 6], recipe.seed, s) for s in range(6)]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
