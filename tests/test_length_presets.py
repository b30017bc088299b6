"""Length-stable presets at the model level: every mode agrees, they save and load, and S stays bounded."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_base, tiny_linspec
from transformers import AutoModelForCausalLM

import linspec
from linspec.config import PRESETS, LinspecConfig
from linspec.errors import LinspecError
from linspec.models import hf
from linspec.models.terms.grouped import initial_decay_logits
from linspec.speculative import ModelDrafter, PromptLookupDrafter, speculative_generate

STABLE_PRESETS = ["stable", "decay", "mean", "normalized", "window"]
TINY_WINDOW = {"local_window": 5, "sink_tokens": 2}  # so that 23-token tests cross the window and use the sinks


def preset_model(preset: str, arch: str = "llama", group_size: int = 4):
    """A tiny converted model with a preset's memory, random γ/conv and decays moved off their initial values."""
    settings = {k: v for k, v in PRESETS[preset].items() if k not in ("group_size", "conv_taps")}
    if "local_window" in settings:
        settings.update(TINY_WINDOW)
    model = tiny_linspec(arch, group_size=group_size, conv_taps=3, **settings)
    with torch.no_grad():
        for index, module in enumerate(model.linspec_modules()):
            if module.decay_logit is not None:
                module.decay_logit.add_(torch.linspace(-2.0, 0.5, module.decay_logit.numel()) * (index + 1))
    return model


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_paper_stays_the_default_and_stable_is_recommended_and_valid():
    assert LinspecConfig() == LinspecConfig.from_preset("paper")
    assert not LinspecConfig().global_decay and LinspecConfig().global_norm == "none"
    stable = LinspecConfig.from_preset("stable")
    assert stable.global_decay and stable.global_norm == "mean" and stable.feature_map == "l2norm"
    for name in PRESETS:
        assert LinspecConfig.from_dict(LinspecConfig.from_preset(name).to_dict()) == LinspecConfig.from_preset(name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_norm": "key"}, "positive feature map"),  # q̂ᵀz under the L2 map can be ≤ 0
        ({"global_norm": "sum"}, "global_norm must be one of"),
        ({"global_decay": 1}, "global_decay must be true or false"),
    ],
)
def test_unsafe_or_invalid_memory_settings_are_rejected(kwargs, message):
    with pytest.raises(LinspecError, match=message):
        LinspecConfig(**kwargs)


def test_conversion_initialises_one_decay_per_kv_head():
    model = linspec.convert(tiny_base("llama"), LinspecConfig.from_preset("stable", group_size=8, conv_taps=4))
    for module in model.linspec_modules():
        assert module.decay_logit.shape == (2,)  # num_key_value_heads: S is stored per kv head
        torch.testing.assert_close(module.decay_logit.detach(), initial_decay_logits(2).float())
        decay = torch.sigmoid(module.decay_logit.detach().double())
        assert torch.all(decay > 0.75) and torch.all(decay < 0.999) and decay[0] < decay[1]
    paper = linspec.convert(tiny_base("llama"), LinspecConfig(group_size=8, conv_taps=4))
    assert not any("decay_logit" in name for name in paper.state_dict())  # the paper's checkpoints are unchanged


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("preset", STABLE_PRESETS)
def test_prefill_plus_decode_equals_full_forward(preset, arch):
    """Chunked (no cache), extend with left padding, recurrent decode and a multi-token continuation agree."""
    model = preset_model(preset, arch).double()
    ids = random_ids(2, 23)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's real positions, as generate() computes them

    def step(lo: int, hi: int) -> torch.Tensor:
        inputs = {"attention_mask": mask[:, :hi], "position_ids": positions[:, lo:hi], **hf.cache_kwargs(cache)}
        return model(ids[:, lo:hi], **inputs).logits

    with torch.no_grad():
        full = [model(ids[:1], use_cache=False).logits, model(ids[1:, 3:], use_cache=False).logits]
        cache = model.new_cache()
        pieces = [step(0, 9), *(step(t, t + 1) for t in range(9, 15)), step(15, 23)]
    cached = torch.cat(pieces, dim=1)
    assert (cached[:1] - full[0]).abs().max().item() < 1e-10
    assert (cached[1:, 3:] - full[1]).abs().max().item() < 1e-10


@pytest.mark.parametrize("preset", STABLE_PRESETS)
def test_save_and_load_roundtrip_keeps_the_memory(preset, tmp_path):
    model = preset_model(preset)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.linspec_settings == model.config.linspec_settings
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = random_ids(2, 19)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("preset", ["stable", "normalized", "window"])
@torch.no_grad()
def test_speculative_greedy_equals_plain_greedy(preset):
    """Tree verify and commit (paths crossing groups of 4) reproduce plain greedy decoding token for token.

    Two rows (one left-padded) and a different decay in every layer: the commit appends all layers at once with
    per-row decays, so a row or layer given another's λ would change the tokens."""
    target = preset_model(preset).double()
    prompt = random_ids(2, 11, seed=3)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    prompt = prompt * mask
    expected = target.generate(prompt, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    drafters = {"self": ModelDrafter(target, num_tokens=5), "lookup": PromptLookupDrafter(num_tokens=4, num_drafts=2)}
    for name, drafter in drafters.items():
        out = speculative_generate(target, drafter, prompt, 14, attention_mask=mask, eos_token_id=2, pad_token_id=0)
        assert name != "self" or out.stats.accepted > 0  # the target drafting for itself: paths are committed
        assert torch.equal(out.sequences[:, : expected.shape[1]], expected), name


def global_term_norms(preset: str, length: int) -> torch.Tensor:
    """Mean output norm of one layer's global term per 256-token window, for random hidden states of ``length``."""
    settings = {k: v for k, v in PRESETS[preset].items() if k != "conv_taps"}
    model = linspec.convert(tiny_base("llama", max_position_embeddings=length), LinspecConfig(conv_taps=1, **settings))
    module = model.linspec_modules()[0]
    with torch.no_grad():
        module.global_scale.fill_(1.0)  # the conv is zero: output = local + global; local is the same in both
        hidden = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(0)) + 1.0  # keys share a mean
        positions = torch.arange(length)[None]
        embeddings = model.model.rotary_emb(hidden, positions)
        with_global = module(hidden, embeddings)[0]
        module.global_scale.zero_()
        local_only = module(hidden, embeddings)[0]
    return (with_global - local_only).norm(dim=-1).view(-1, 256).mean(dim=-1)


@pytest.mark.parametrize("preset", ["stable", "mean", "normalized"])
def test_the_global_term_stays_bounded_as_context_grows_where_the_paper_grows(preset, one_torch_thread):
    paper, stable = global_term_norms("paper", 4096), global_term_norms(preset, 4096)
    assert paper[-1] > 4 * paper[1]  # the paper's S keeps growing with every group (×5 from 512 to 4096 here)
    assert stable[-1] < 1.5 * stable[1:].min()  # bounded: the last window is no larger than the early ones
    assert stable[1:].max() < paper[1]  # and at most the size the paper had within its training length


def test_the_gamma_trainable_keyword_opens_the_decays():
    """Recipes train the global term's parameters together: ``trainable: [gamma]`` matches γ and λ."""
    from linspec.train.trainable import TRAINABLE_PATTERNS

    names = [name for name, _ in preset_model("stable").named_parameters()]
    opened = [name for name in names if any(p in name for p in TRAINABLE_PATTERNS["gamma"])]
    assert sorted({name.rsplit(".", 1)[-1] for name in opened}) == ["decay_logit", "global_scale"]
    assert len(opened) == 2 * 3  # three linear layers


@pytest.mark.parametrize(("sink_positions", "invariant"), [("adjacent", True), ("absolute", False)])
@torch.no_grad()
def test_adjacent_sinks_make_the_window_translation_invariant(sink_positions, invariant):
    """With γ = 0 and no conv every layer is the window: the last token then reads only the sinks and the last
    (layers × W) tokens. Adjacent sinks give it the same logits however long the text between them is; absolute
    sinks let their RoPE distance — and so the logits — change with that length (the perplexity drift)."""
    model = linspec.convert(
        tiny_base("llama"),
        LinspecConfig(local_kernel="softmax", local_window=5, sink_tokens=2, sink_positions=sink_positions),
    ).double()
    head, tail = random_ids(1, 2, seed=1), random_ids(1, 16, seed=2)  # 3 layers reach back 3 × (W − 1) = 12
    short = torch.cat([head, random_ids(1, 7, seed=3), tail], dim=1)
    long = torch.cat([head, random_ids(1, 30, seed=4), tail], dim=1)
    gap = (model(short).logits[0, -1] - model(long).logits[0, -1]).abs().max().item()
    if invariant:
        assert gap < 1e-7, gap  # HF computes the RoPE angles in float32: the same rotation at other positions
    else:
        assert gap > 1e-5, gap
