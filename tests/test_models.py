"""Converted models of every supported architecture behave like HF causal LMs with a constant-size cache."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from tiny_models import BASES, decode_one_by_one, randomize_linspec_parameters, tiny_base, tiny_linspec
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import linspec
from linspec.config import PRESETS
from linspec.models import hf, terms
from linspec.models.attention import LinspecAttention
from linspec.models.runner import ModelRunner
from linspec.models.terms.base import Term
from linspec.ops.extend import gather_tokens

ARCHS = sorted(BASES)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_conversion_swaps_every_attention_and_keeps_pretrained_weights(arch):
    base = tiny_base(arch)
    expected = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = linspec.convert(base, linspec.LinspecConfig(group_size=8, conv_taps=4))
    modules = model.linspec_modules()
    assert len(modules) == 3 and type(model).__name__.startswith("Linspec")
    for module in modules:
        assert module.global_scale.shape == () and module.global_scale.item() == 0.0
        assert module.conv_weight.shape == (4, 4) and not module.conv_weight.any()
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert model.config.linspec["group_size"] == 8 and model.config.base_model_type == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_at_t_do_not_depend_on_later_tokens(arch):
    model = tiny_linspec(arch).double()
    ids = random_ids(1, 24)
    changed = ids.clone()
    changed[:, 13:] = random_ids(1, 11, seed=5)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, :13] - b[:, :13]).abs().max().item() < 1e-10
    assert (a[:, 13:] - b[:, 13:]).abs().max().item() > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_padded_generate_equals_each_row_alone(arch):
    model = tiny_linspec(arch)
    prompts = [random_ids(1, n, seed=n)[0] for n in (5, 12, 9)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    ids[mask == 0] = 50  # a real token id: padding must be ignored because of the mask, not because it is 0
    kwargs = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        assert batched[row, width:].tolist() == alone[0, len(prompt) :].tolist(), row


def test_generate_uses_a_cache_whose_size_does_not_grow():
    model = tiny_linspec("llama")
    ids = random_ids(1, 10)
    sizes = []
    with torch.no_grad():
        cache = model.new_cache()
        logits = model(ids, **hf.cache_kwargs(cache)).logits
        for _ in range(40):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, **hf.cache_kwargs(cache)).logits
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1 and sizes[0] > 0
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(hf.output_cache(out), linspec.LinspecCache)


def test_sampling_generate_is_reproducible_and_in_vocabulary():
    model = tiny_linspec("qwen3")
    ids = random_ids(2, 7)
    torch.manual_seed(3)
    a = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    torch.manual_seed(3)
    b = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    assert torch.equal(a, b) and a.shape == (2, 17) and int(a.max()) < 97


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_roundtrip_gives_identical_logits(arch, tmp_path):
    model = tiny_linspec(arch)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    ids = random_ids(2, 19)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # The directory carries remote code for processes without linspec (tests/test_remote_code.py); this process
    # loaded the native class above without trust_remote_code.
    assert f"modeling_linspec.{type(model).__name__}" in (tmp_path / "config.json").read_text()


def test_hybrid_keeps_chosen_layers_softmax():
    """Decoding equivalences of hybrids are pinned in test_hf_surface.py; here: which layers are which."""
    model = tiny_linspec("llama", softmax_layers=(1,))
    kinds = [type(layer.self_attn) for layer in model.model.layers]
    assert kinds[1] is not LinspecAttention and kinds[0] is LinspecAttention and kinds[2] is LinspecAttention


@pytest.mark.parametrize("arch", ARCHS)
def test_all_layers_softmax_equals_the_original_exactly(arch):
    base = tiny_base(arch, seed=4)
    ids = random_ids(2, 15)
    with torch.no_grad():
        expected = base(ids).logits
        greedy = base.generate(ids, max_new_tokens=6, do_sample=False)
    model = linspec.convert(base, linspec.LinspecConfig(softmax_layers=(0, 1, 2)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), greedy)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kv_head_kept_softmax_equals_the_original(arch):
    """``softmax_heads`` naming every kv head of every layer is the softmax model again, in a full forward and in
    batched, left-padded cached generation (the heads' KV and masks, not the linear path, produce the output)."""
    base = tiny_base(arch, seed=4)
    ids, mask = random_ids(2, 15), torch.ones(2, 15, dtype=torch.long)
    mask[1, :6] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = base(ids).logits
        greedy = base.generate(ids, **kwargs)
    every = tuple((layer, head) for layer in range(3) for head in range(2))
    model = linspec.convert(base, linspec.LinspecConfig(group_size=8, conv_taps=4, softmax_heads=every))
    randomize_linspec_parameters(model)  # γ and conv may be anything: the softmax heads replace the whole output
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(ids, **kwargs), greedy)
    beams = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **beams), base.generate(ids, **beams))  # the heads' KV follows the beams


def test_softmax_heads_replace_only_their_own_query_heads():
    """Kv head 1 of layer 0 kept softmax: its query heads (2 and 3 of 4) carry the parent's softmax attention,
    heads 0 and 1 the linear layer's output, unchanged by the choice."""
    ids = random_ids(1, 20)
    models = {
        "softmax": tiny_base("llama", seed=2),
        "linear": tiny_linspec("llama", seed=2),
        "mixed": tiny_linspec("llama", seed=2, softmax_heads=((0, 1),)),
    }
    heads = {}
    for name, model in models.items():  # what layer 0 hands its o_proj: every head's output, (T, H, D)
        hook = lambda module, args, name=name: heads.__setitem__(name, args[0][0].view(20, 4, 16))  # noqa: E731
        handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(hook)
        with torch.no_grad():
            model(ids)
        handle.remove()
    torch.testing.assert_close(heads["mixed"][:, 2:], heads["softmax"][:, 2:], rtol=1e-5, atol=1e-6)
    assert torch.equal(heads["mixed"][:, :2], heads["linear"][:, :2])
    assert not torch.allclose(heads["linear"][:, 2:], heads["softmax"][:, 2:], atol=1e-3)


def test_softmax_heads_grow_the_cache_by_their_own_columns_only():
    model = tiny_linspec("llama", softmax_heads=((0, 1), (2, 0)))
    sizes = []
    with torch.no_grad():
        cache = model.new_cache()
        logits = model(random_ids(1, 10), **hf.cache_kwargs(cache)).logits
        for _ in range(5):
            logits = model(logits[:, -1:].argmax(-1), **hf.cache_kwargs(cache)).logits
            sizes.append(cache.nbytes())
    per_token = 2 * 2 * 16 * 4  # two heads' keys and values, 16 float32 numbers each
    assert [b - a for a, b in itertools.pairwise(sizes)] == [per_token] * 4


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(linspec.LinspecError, match="llama, mistral, qwen2, qwen3"):
        linspec.convert(gpt2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"group_size": 0}, "group_size must be an integer in 1.."),
        ({"conv_taps": -3}, "conv_taps must be an integer in 1.."),
        ({"feature_map": "tanh"}, "feature_map must be one of"),
        ({"softmax_layers": (-1,)}, "non-negative"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, message):
    with pytest.raises(linspec.LinspecError, match=message):
        linspec.LinspecConfig(**kwargs)


def test_softmax_layer_out_of_range_is_rejected():
    with pytest.raises(linspec.LinspecError, match="out of range"):
        linspec.convert(tiny_base("llama"), linspec.LinspecConfig(softmax_layers=(3,)))


def test_converting_a_linspec_model_again_is_rejected():
    with pytest.raises(linspec.LinspecError, match="already a linspec model"):
        linspec.convert(tiny_linspec("llama"))


def test_in_group_kernel_is_none_where_the_window_is_the_local_term():
    """The grouped ops' κ is read from the settings as they are: a window model keeps ``local_kernel: softmax``."""
    window = linspec.LinspecConfig.from_preset("window")
    assert (window.local_kernel, window.in_group_kernel) == ("softmax", "none")
    assert linspec.LinspecConfig.from_preset("elu").in_group_kernel == "identity"
    assert linspec.LinspecConfig().in_group_kernel == "relu2"


@dataclass
class PreviousValue:
    value: torch.Tensor  # (B, Hkv, 1, D): the last real token's value, zeros before the first


class PreviousValueTerm(Term):
    """A term written here against the ``Term`` interface alone, as a new term would be: each token reads the
    value of the real token before it in its row (zeros for the first), per kv head, halved."""

    name = "previous"

    def __init__(self, layer) -> None:
        self.repeats = layer.num_heads // layer.num_kv_heads
        self.shape = (layer.num_kv_heads, 1, layer.head_dim)

    @classmethod
    def for_layer(cls, layer) -> PreviousValueTerm:
        return cls(layer)

    def empty(self, batch, dtype, device) -> PreviousValue:
        return PreviousValue(torch.zeros(batch, *self.shape, dtype=dtype, device=device))

    def _out(self, previous: torch.Tensor) -> torch.Tensor:
        return 0.5 * previous.repeat_interleave(self.repeats, dim=1)

    def chunked(self, x):
        return self._out(F.pad(x.v, (0, 0, 1, 0))[:, :, :-1])

    def extend(self, x, state):
        previous = state.slices[self.name].value
        length = x.v.shape[2]
        real = torch.ones(x.v.shape[0], length, dtype=torch.bool) if x.token_mask is None else x.token_mask.bool()
        outs = []
        for t in range(length):
            here = real[:, t, None, None, None]
            outs.append(torch.where(here, previous, 0.0))
            previous = torch.where(here, x.v[:, :, t : t + 1], previous)
        return self._out(torch.cat(outs, dim=2)), PreviousValue(previous)

    def verify(self, x, state):
        parents = x.layout.parents
        from_parent = gather_tokens(x.v, parents.clamp(min=0))
        previous = torch.where((parents >= 0)[:, None, :, None], from_parent, state.slices[self.name].value)
        return self._out(previous), x.v

    def commit(self, state, kept, path, path_mask):
        count = path_mask.sum(dim=1)
        last = gather_tokens(kept, path.gather(1, (count - 1).clamp(min=0)[:, None]))
        return PreviousValue(torch.where((count > 0)[:, None, None, None], last, state.slices[self.name].value))


@torch.no_grad()
def test_a_term_added_by_registration_runs_in_every_mode(monkeypatch):
    """A new term is one class plus its place in ``TERM_KINDS``: the layer runs it in every mode beside the
    window, the memory and the softmax heads, keeps its slice, and counts positions for it. Every mode then agrees
    with the whole-sequence forward: a left-padded prefill, decode steps and an extend; a tree whose nodes equal
    decoding their paths; and after a commit, a tree that sees exactly the committed context."""
    settings = {**PRESETS["window"], "local_window": 6, "sink_tokens": 2, "softmax_heads": ((0, 1),)}
    without = tiny_linspec("llama", seed=4, **settings).double()
    monkeypatch.setattr(terms, "TERM_KINDS", (*terms.TERM_KINDS, PreviousValueTerm))
    model = tiny_linspec("llama", seed=4, **settings).double()
    assert all(isinstance(module.terms[-1], PreviousValueTerm) for module in model.linspec_modules())
    ids = random_ids(2, 17, seed=5)
    assert not torch.allclose(model(ids, use_cache=False).logits, without(ids, use_cache=False).logits, atol=1e-3)

    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, :4] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # each row's own, as generate() passes them
    cache = model.new_cache()

    def forward(columns: slice) -> torch.Tensor:
        return model(
            ids[:, columns], attention_mask=mask[:, : columns.stop].long(), position_ids=positions[:, columns],
            **hf.cache_kwargs(cache),
        ).logits  # fmt: skip

    steps = [forward(slice(0, 9)), *(forward(slice(t, t + 1)) for t in range(9, 12)), forward(slice(12, 17))]
    cached = torch.cat(steps, dim=1)
    for row in range(2):
        alone = model(ids[row : row + 1, mask[row]], use_cache=False).logits[0]
        torch.testing.assert_close(cached[row, mask[row]], alone, rtol=0, atol=1e-10)
    assert cache.layers[0].state.position.tolist() == [17, 13]

    parents = [-1, 0, 0, 1, 3, 2]
    runner = ModelRunner(model, 2)
    runner.extend(ids, mask)
    nodes = random_ids(2, len(parents), seed=6)
    tree, logits = runner.tree_logits(nodes, torch.tensor([parents] * 2))
    for row in range(2):
        for node, path in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 3, 4], [0, 2, 5]]):
            sequence = torch.cat([ids[row, mask[row]], nodes[row, path]])[None]
            torch.testing.assert_close(
                logits[row, node], decode_one_by_one(model, sequence)[0][0, -1], rtol=0, atol=1e-9
            )
    tree.commit(torch.tensor([[0, 1, 3], [0, 2, 0]]), torch.tensor([[True, True, True], [True, True, False]]))
    following = random_ids(2, 2, seed=7)
    _, after = runner.tree_logits(following, torch.tensor([[-1, 0]] * 2))
    for row, path in enumerate([[0, 1, 3], [0, 2]]):
        sequence = torch.cat([ids[row, mask[row]], nodes[row, path], following[row]])[None]
        torch.testing.assert_close(after[row], decode_one_by_one(model, sequence)[0][0, -2:], rtol=0, atol=1e-9)
