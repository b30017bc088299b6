"""Trained drafters (Medusa, EAGLE-style, ReDrafter-style) on tiny random models: exactness under greedy and
sampling, chain and tree, linear / hybrid / softmax targets; the drafter directory, its fingerprint checks,
the drafter recipe (train, resume, refuse) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_speculative import (
    _chi_square_p_value,
    _exact_marginals,
    attributes_rebound_by_propose,
    batch_of_prompts,
    make_target,
)

import linspec
from linspec.drafting import load_drafter, save_drafter
from linspec.drafting.fingerprint import target_fingerprint
from linspec.drafting.store import KINDS, build
from linspec.speculative import FallbackDrafter, PromptLookupDrafter, SamplingConfig, speculative_generate
from linspec.train.cards import drafter_card

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_drafter(kind: str, target, depth: int = 3, draft_vocab: int | None = None, seed: int = 0):
    """A drafter module with random weights (drafts neither always right nor always wrong)."""
    vocab = target.get_output_embeddings().weight.shape[0]
    token_ids = None if draft_vocab is None else torch.randperm(vocab, generator=torch.Generator().manual_seed(1))
    settings = {"depth": depth, "draft_vocab": draft_vocab}
    module = build(kind, target, settings, None if token_ids is None else token_ids[:draft_vocab].sort().values)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=gen))
    return module.eval().requires_grad_(False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target_kind", ("softmax", "linear", "hybrid"))
@torch.no_grad()
def test_greedy_output_equals_plain_greedy_for_each_trained_drafter(kind, target_kind):
    target = make_target(target_kind)
    prompt, mask = batch_of_prompts()
    expected = target.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for width, draft_vocab in ((1, None), (3, 40)):  # a chain on the full head, a tree on a reduced one
        drafter = random_drafter(kind, target, draft_vocab=draft_vocab).drafter(3, width)
        out = speculative_generate(target, drafter, prompt, 16, attention_mask=mask, eos_token_id=2, pad_token_id=0)
        assert torch.equal(out.sequences[:, : expected.shape[1]], expected), (width, draft_vocab)
        assert out.stats.drafted > 0
    drafted = []
    for confidence in (0.0, 0.999):  # unconfident drafts are not proposed; the output does not change
        drafter = random_drafter(kind, target).drafter(3, 2, min_confidence=confidence)
        out = speculative_generate(target, drafter, prompt, 16, attention_mask=mask, eos_token_id=2, pad_token_id=0)
        assert torch.equal(out.sequences[:, : expected.shape[1]], expected), confidence
        drafted.append(out.stats.drafted)
    assert drafted[1] < drafted[0]


class RecordingFallback(FallbackDrafter):
    """Records which rows prompt lookup served in each round."""

    served: list[torch.Tensor]

    def propose(self, request):
        draft = super().propose(request)
        self.served.append(draft.state.by_first.clone())
        return draft


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target_kind", ("softmax", "linear", "hybrid"))
@torch.no_grad()
def test_lookup_first_then_a_trained_drafter_keeps_greedy_output_exact(kind, target_kind):
    """Rows whose context repeats get lookup's drafts, the others the trained drafter's, in the same rounds."""
    target = make_target(target_kind)
    prompt, mask = batch_of_prompts()  # row 2 repeats its first half: lookup finds matches there
    expected = target.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    drafter = RecordingFallback(PromptLookupDrafter(num_tokens=4), random_drafter(kind, target).drafter(3, 2))
    drafter.served = []
    out = speculative_generate(target, drafter, prompt, 16, attention_mask=mask, eos_token_id=2, pad_token_id=0)
    assert torch.equal(out.sequences[:, : expected.shape[1]], expected)
    assert bool(drafter.served[0][2]) and any(bool(s.any()) and not bool(s.all()) for s in drafter.served)


@pytest.mark.parametrize(
    "kind, target_kind, width, draft_vocab, lookup_first",
    [
        ("medusa", "linear", 1, None, False), ("medusa", "softmax", 3, 16, False),
        ("eagle", "linear", 3, 16, False), ("eagle", "softmax", 1, None, False),
        ("redrafter", "linear", 1, 16, False), ("redrafter", "softmax", 3, None, False),
        ("eagle", "linear", 2, 16, True),
    ],
)  # fmt: skip
@torch.no_grad()
def test_sampled_tokens_follow_the_target_distribution_with_trained_drafters(
    kind, target_kind, width, draft_vocab, lookup_first
):
    """10k rows: new tokens 1–3 match the target's exact marginals (chi-square), chain and tree, with a reduced
    draft vocabulary (q is zero outside it) or the full one; and with prompt lookup first, whose point-mass rows
    share rounds with rows drafted from q."""
    vocab, samples = 24, 10_000
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    target = make_target(target_kind, seed=0, **small)
    drafter = random_drafter(kind, target, depth=2, draft_vocab=draft_vocab).drafter(2, width)
    if lookup_first:
        drafter = RecordingFallback(PromptLookupDrafter(num_tokens=2), drafter)
        drafter.served = []
    prompt = torch.tensor([[3, 5, 9, 3, 5]])
    settings = dict(temperature=0.9, top_k=20)
    gen = torch.Generator().manual_seed(7)
    out = speculative_generate(target, drafter, prompt.expand(samples, -1), 3, do_sample=True, generator=gen,
                               **settings)  # fmt: skip
    assert out.stats.accepted > 0
    exact = _exact_marginals(target, prompt, SamplingConfig(do_sample=True, **settings), 3)
    for position in range(3):
        counts = torch.bincount(out.sequences[:, -3 + position], minlength=vocab)
        assert _chi_square_p_value(counts, exact[position]) > 1e-4, position
    if lookup_first:  # some round mixed lookup rows with trained-drafter rows
        assert any(bool(s.any()) and not bool(s.all()) for s in drafter.served)


def test_a_saved_drafter_loads_only_for_its_target(tmp_path):
    target = make_target("linear")
    module = random_drafter("eagle", target, draft_vocab=30)
    card = drafter_card("eagle", module.settings, target_fingerprint(target), {}, str(tmp_path / "d"))
    save_drafter(module, tmp_path / "d", target, card=card)
    loaded = load_drafter(tmp_path / "d", target)
    h = torch.randn(2, 64)
    assert torch.equal(
        loaded.vocab(loaded.cell(h, torch.tensor([4, 5]))), module.vocab(module.cell(h, torch.tensor([4, 5])))
    )
    own = 4 * sum(p.numel() for p in module.parameters()) + 8 * 30  # its weights and draft ids, no target tensor
    assert (tmp_path / "d" / "drafter.safetensors").stat().st_size < own + 4096
    card = (tmp_path / "d" / "README.md").read_text()  # the drafter's model card, as training writes it
    assert "# linspec eagle drafter" in card and "cannot load" in card
    assert f"--draft eagle --drafter {tmp_path / 'd'}" in card  # where it was written, not a placeholder
    with pytest.raises(linspec.LinspecError, match="trained for another target: weights"):
        load_drafter(tmp_path / "d", make_target("linear", seed=3))
    with pytest.raises(linspec.LinspecError, match="trained for another target: linear/softmax layout"):
        load_drafter(tmp_path / "d", make_target("hybrid"))
    with pytest.raises(linspec.LinspecError, match="trained for another target: vocabulary size"):
        load_drafter(tmp_path / "d", make_target("linear", vocab_size=50))
    with pytest.raises(linspec.LinspecError, match="exists"):
        save_drafter(module, tmp_path / "d", target)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no such directory"),
        (lambda d: d.mkdir(), "no drafter.json"),
        (lambda d: (d.mkdir(), (d / "drafter.json").write_text("{")), "not valid JSON"),
        (lambda d: (d.mkdir(), (d / "drafter.json").write_text('{"format": "x"}')), "does not say"),
    ],
)
def test_a_missing_or_damaged_drafter_is_one_error(tmp_path, setup, message):
    setup(tmp_path / "d")
    with pytest.raises(linspec.LinspecError, match=message):
        load_drafter(tmp_path / "d", make_target("softmax"))


def test_depth_and_settings_out_of_range_are_refused():
    target = make_target("softmax")
    module = random_drafter("medusa", target, depth=3)
    for bad in (0, 4, True):
        with pytest.raises(linspec.LinspecError, match=r"drafts 1..3 tokens per round"):
            module.drafter(bad)
    with pytest.raises(linspec.LinspecError, match="tree_width must be an integer >= 1, got 0"):
        module.drafter(2, 0)
    with pytest.raises(linspec.LinspecError, match=r"depth must be an integer in 1\.\.16"):
        build("redrafter", target, {"depth": 17})
    with pytest.raises(linspec.LinspecError, match="unknown medusa drafter setting 'width'"):
        build("medusa", target, {"width": 2})
    from linspec.drafting.registry import drafter_spec

    with pytest.raises(linspec.LinspecError, match="is a medusa drafter, not eagle"):
        drafter_spec("eagle", drafter=module).build(target)
    with pytest.raises(linspec.LinspecError, match="--draft redrafter needs --drafter DIR"):
        drafter_spec("redrafter")
    with pytest.raises(linspec.LinspecError, match=r"drafts 1\.\.3 tokens per round"):
        drafter_spec("medusa", drafter=module, num_draft_tokens=4).build(target)


def test_the_registry_lists_every_trained_kind_the_store_can_load():
    from linspec.drafting import registry

    assert tuple(KINDS) == registry.TRAINED_KINDS and set(KINDS) < set(registry.KINDS)
    assert [kind for kind in registry.KINDS if registry.needs_trained_drafter(kind)] == list(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_a_trained_spec_builds_the_drafter_its_module_makes(kind, tmp_path):
    """From a directory or a loaded module: the module's own drafter (the same drafts, so the same acceptance);
    with ``lookup_first``, prompt lookup before it; either keeps its round in the ``Draft`` (no attribute
    rebound by ``propose``)."""
    from linspec.drafting.registry import drafter_spec

    target = make_target("linear")
    prompt, mask = batch_of_prompts()
    module = random_drafter(kind, target)
    save_drafter(module, tmp_path / "d", target)
    options = dict(attention_mask=mask, pad_token_id=0)
    expected = speculative_generate(target, module.drafter(2, 2), prompt, 10, **options)
    for source in (module, str(tmp_path / "d")):
        built = drafter_spec(kind, drafter=source, num_draft_tokens=2, tree_width=2).build(target)
        out = speculative_generate(target, built, prompt, 10, **options)
        assert torch.equal(out.sequences, expected.sequences)
        assert (out.stats.drafted, out.stats.accepted) == (expected.stats.drafted, expected.stats.accepted) != (0, 0)
    first = drafter_spec(kind, drafter=module, lookup_first=True, max_ngram=2).build(target)
    assert isinstance(first, FallbackDrafter) and first.first.max_ngram == 2 and first.then.num_tokens == 3
    assert attributes_rebound_by_propose(first, target, prompt, mask) == set()
    assert attributes_rebound_by_propose(module.drafter(3, 2), target, prompt, mask) == set()


def test_recipe_trains_resumes_and_the_cli_generates_with_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))
    from linspec.cli import main
    from linspec.train.tiny import make_tiny_base

    base = make_tiny_base(tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("\n".join(f"Tell me about the number {i}." for i in range(8)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"drafter: {{kind: medusa, depth: 2, draft_vocab: 64}}\ntarget: {base}\noutput: {tmp_path / 'run'}\n"
        f"data: {{prompts: {tmp_path / 'prompts.txt'}, num_prompts: 6, eval_prompts: 2, max_new_tokens: 8,\n"
        "       text: builtin:sample, text_tokens: 40, text_length: 12}\n"
        "train: {steps: 4, batch_size: 8, warmup_steps: 1, eval_every: 2}\ncheckpoint: {every: 2}\n"
    )
    assert main(["train", str(recipe)]) == 0
    from safetensors.torch import load_file

    (cached,) = (tmp_path / "cache" / "drafting").glob("*.safetensors")
    data = load_file(str(cached))
    assert data["train_tokens"].shape == (6 + 4, 12)  # 6 continuations of 1 + 8 tokens, 4 windows of 12 tokens
    assert data["eval_labels"].shape == data["eval_tokens"].shape == (2, 9)
    drafter = tmp_path / "run" / "drafter"
    config = json.loads((drafter / "drafter.json").read_text())
    assert config["kind"] == "medusa" and len(config["training"]["eval_accuracy_by_depth"]) == 2
    assert main(["train", str(recipe), "train.steps=6", "--resume"]) == 0  # continues from step 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [5, 6, 6]
    assert main(["train", str(recipe)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    other = make_tiny_base(tmp_path / "other", seed=1)
    assert main(["train", str(recipe), f"target={other}", "--resume"]) == 2
    assert "is not the target of the run" in capsys.readouterr().err
    args = ["generate", str(base), "--prompt", "Tell me about the number 3.", "--max-new-tokens", "6", "--json"]
    assert main([*args, "--draft", "medusa", "--drafter", str(drafter), "--tree-width", "2"]) == 0
    with_heads = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == with_heads["texts"]
    assert main([*args, "--draft", "medusa", "--drafter", str(drafter), "--lookup-first", "--max-ngram", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == with_heads["texts"]
    assert main(["train", str(recipe), "data.prompt_kinds=[story]", f"output={tmp_path / 'kinds'}"]) == 2
    assert "holds prompts verbatim" in capsys.readouterr().err and not (tmp_path / "kinds").exists()
    assert main([*args, "--draft", "medusa", "--drafter", str(drafter), "--num-draft-tokens", "3"]) == 2
    assert "drafts 1..2 tokens per round" in capsys.readouterr().err
    assert main(["generate", str(other), "--prompt", "hi", "--draft", "medusa", "--drafter", str(drafter)]) == 2
    assert "trained for another target" in capsys.readouterr().err


def test_examples_feed_the_text_and_label_with_the_targets_choices():
    """Position (text 0, t = 1): inputs are tokens t+1.. (fed to the drafter), labels the target's choice after
    each, hidden states after each; PAD past the end of the text and where no label was recorded."""
    from linspec.drafting.data import PAD, examples

    tokens = torch.tensor([[10, 11, 12, 13, PAD], [20, 21, 22, 23, 24]])
    labels = torch.tensor([[31, 32, 33, PAD, PAD], [41, 42, 43, 44, 45]])
    hidden = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1).expand(2, 5, 3)
    h, inputs, targets, future_hidden = examples(tokens, hidden, labels, torch.tensor([[0, 1], [1, 3]]), depth=3)
    assert h[:, 0].tolist() == [1.0, 8.0]
    assert inputs.tolist() == [[12, 13, PAD], [24, PAD, PAD]]
    assert targets.tolist() == [[33, PAD, PAD], [45, PAD, PAD]]
    assert future_hidden[0, :2, 0].tolist() == [2.0, 3.0] and future_hidden[1, 0, 0].item() == 9.0


@torch.no_grad()
def test_read_text_records_the_targets_final_states_and_greedy_choices():
    from linspec.drafting.data import read_text

    target = make_target("linear")
    windows = torch.randint(3, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    tokens, hidden, labels = read_text(target, windows, batch_size=2)
    out = target(windows, output_hidden_states=True)
    assert torch.equal(tokens, windows)
    assert torch.equal(labels, out.logits.argmax(-1))
    torch.testing.assert_close(hidden, out.hidden_states[-1])


def test_text_windows_are_seeded_and_refuse_more_text_than_the_corpus_has(tmp_path):
    from linspec.drafting.data import text_windows
    from linspec.train.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    first = text_windows(tokenizer, "builtin:sample", 64, 16, seed=0)
    assert first.shape == (4, 16)
    assert torch.equal(first, text_windows(tokenizer, "builtin:sample", 64, 16, seed=0))
    assert not torch.equal(first, text_windows(tokenizer, "builtin:sample", 64, 16, seed=1))
    with pytest.raises(linspec.LinspecError, match=r"data\.text_tokens: builtin:sample gives"):
        text_windows(tokenizer, "builtin:sample", 10**7, 16, seed=0)
