"""Golden outputs: logits of converted tiny models in every execution mode and the tokens of ``speculative_generate``.

The other tests check that modes agree with each other; these check that nothing changed at all. They pin the
exact float64 logits (chunked forward, prefill + recurrent decode, extend, tree verification, the tree after a
commit) of the default ``window`` preset, the ``paper`` preset and a hybrid with softmax layers and heads, and the
greedy and seeded-sampling tokens of speculative generation with each drafter kind that needs no training. A
refactor that reorders one sum fails here, so moving code around is proven to be only a move.

The file ``golden/outputs.safetensors`` was written by ``LINSPEC_WRITE_GOLDEN=1 pytest tests/test_golden.py``.
Bit-identity is asserted where the machine computes as the writer's did (same torch, vector unit and CPU model,
recorded in the file: ``tests/arithmetic.py``); elsewhere kernels may round differently, so float64 agreement to
1e-12 is asserted instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from arithmetic import assert_reproduced, machine
from safetensors.torch import load_file, save_file
from tiny_models import tiny_base, tiny_linspec

from linspec.models.runner import ModelRunner
from linspec.speculative import (
    EarlyExitDrafter,
    FallbackDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    speculative_generate,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOLDEN = Path(__file__).parent / "golden" / "outputs.safetensors"
WRITING = os.environ.get("LINSPEC_WRITE_GOLDEN") == "1"
MODELS = {
    "window": dict(preset="window", local_window=12, sink_tokens=2),
    "paper": dict(preset="paper"),
    "hybrid": dict(preset="window", local_window=12, sink_tokens=2, softmax_layers=(1,), softmax_heads=((0, 1),)),
}
PARENTS = [-1, 0, 0, 1, 3, 2, 5]  # a tree whose branches cross a group boundary (G = 8) after a 21-token prompt


def build(kind: str):
    settings = dict(MODELS[kind])
    preset = settings.pop("preset")
    from linspec.config import PRESETS

    return tiny_linspec("qwen3", seed=5, **{**PRESETS[preset], "group_size": 8, "conv_taps": 4, **settings}).double()


def prompt_ids(length: int = 21, seed: int = 11) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, length), generator=gen)
    ids[:, 12:18] = ids[:, 2:8]  # a repeated stretch, so prompt lookup has something to propose
    return ids


@torch.no_grad()
def mode_outputs(kind: str) -> dict[str, torch.Tensor]:
    """Logits of every mode, keyed by mode, for one model."""
    model = build(kind)
    ids = prompt_ids()
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False  # the second row is left-padded: a batch of different lengths
    out = {"forward": model(ids, attention_mask=mask.long(), use_cache=False).logits}

    cache = model.new_cache()
    steps = [model(ids[:, :9], attention_mask=mask[:, :9].long(), cache=cache).logits]
    for t in range(9, 15):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1].long(), cache=cache).logits)
    steps.append(model(ids[:, 15:], attention_mask=mask.long(), cache=cache).logits)  # extend by six
    out["prefill_decode_extend"] = torch.cat(steps, 1)

    runner = ModelRunner(model, 2)
    runner.extend(ids, mask)
    nodes = torch.randint(3, 97, (2, len(PARENTS)), generator=torch.Generator().manual_seed(3))
    tree, out["tree"] = runner.tree_logits(nodes, torch.tensor([PARENTS] * 2))
    tree.commit(torch.tensor([[0, 1, 3, 4], [0, 2, 5, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).bool())
    _, out["tree_after_commit"] = runner.tree_logits(nodes[:, :3], torch.tensor([[-1, 0, 0]] * 2))
    return {f"{kind}/{mode}": logits.contiguous() for mode, logits in out.items()}


def drafters(target) -> dict[str, object]:
    return {
        "none": None,
        "lookup": PromptLookupDrafter(num_tokens=5),
        "lookup_tree": PromptLookupDrafter(num_tokens=4, num_drafts=3, min_ngram=1),
        "early_exit": EarlyExitDrafter(exit_layer=1, num_tokens=3, tree_width=2),
        "model": ModelDrafter(tiny_base("qwen3", seed=6).double(), num_tokens=3),
        "lookup_then_early_exit": FallbackDrafter(PromptLookupDrafter(num_tokens=4), EarlyExitDrafter(exit_layer=2)),
    }


@torch.no_grad()
def generation_outputs(kind: str) -> dict[str, torch.Tensor]:
    """Greedy and seeded-sampling tokens of speculative generation with each drafter, for one model."""
    model = build(kind)
    ids = prompt_ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = {}
    for name, drafter in drafters(model).items():
        greedy = speculative_generate(model, drafter, ids, 14, attention_mask=mask, pad_token_id=0)
        out[f"{kind}/greedy/{name}"] = greedy.sequences
    for name in ("none", "lookup", "early_exit"):
        sampled = speculative_generate(
            model, drafters(model)[name], ids, 14, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
            attention_mask=mask, pad_token_id=0, generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
        out[f"{kind}/sampled/{name}"] = sampled.sequences
    return out


def all_outputs() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for kind in MODELS:
        out.update(mode_outputs(kind))
        out.update(generation_outputs(kind))
    return out


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], str]:
    if WRITING:
        GOLDEN.parent.mkdir(exist_ok=True)
        save_file(all_outputs(), str(GOLDEN), metadata={"machine": machine()})
    from safetensors import safe_open

    with safe_open(str(GOLDEN), "pt") as handle:
        written_on = handle.metadata()["machine"]
    return load_file(str(GOLDEN)), written_on


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_mode_gives_the_golden_logits(kind, golden):
    expected, written_on = golden
    for name, logits in mode_outputs(kind).items():
        assert logits.dtype == torch.float64 and logits.shape == expected[name].shape, name
        assert_reproduced(logits, expected[name], written_on, rtol=0, atol=1e-12, name=name)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_speculative_generation_gives_the_golden_tokens(kind, golden):
    expected, _ = golden
    for name, tokens in generation_outputs(kind).items():
        assert tokens.tolist() == expected[name].tolist(), name


def test_the_golden_file_covers_every_case(golden):
    """A case added to this module without rewriting the file would otherwise pass by having nothing to compare."""
    expected, _ = golden
    names = {f"{kind}/{mode}" for kind in MODELS for mode in ("forward", "prefill_decode_extend", "tree")}
    assert names <= set(expected) and len(expected) == 3 * (4 + 6 + 3)


SAVED = Path(__file__).parent / "golden" / "saved-window-model"  # ``build("window").float().save_pretrained``


@torch.no_grad()
def test_a_model_saved_by_an_earlier_release_loads_with_the_same_logits():
    """Saved directories outlive code moves: their ``auto_map`` shims name linspec module paths, and their
    config and tensor names must still build the same model."""
    from transformers import AutoModelForCausalLM

    ids = prompt_ids()
    expected = build("window").float()(ids, use_cache=False).logits
    loaded = AutoModelForCausalLM.from_pretrained(SAVED).eval()
    assert torch.equal(loaded(ids, use_cache=False).logits, expected)


def test_a_model_saved_by_an_earlier_release_loads_through_its_remote_code_shims(tmp_path):
    import shutil
    import subprocess
    import sys

    shutil.copytree(SAVED, tmp_path / "model")
    script = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "print(type(model).__module__, model(torch.tensor([[5, 6, 7]])).logits.shape[-1])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["linspec.models.modeling", "97"]
