"""linspec.sources.loading: every way of naming a checkpoint, and every way a user can get it wrong.

Fast tests build tiny random Llamas (HF directories, sharded, pickled, and a GGUF file written with the ``gguf``
package) in ``tmp_path``. The ``slow`` tests use the real demo model: it is cached in ``$LINSPEC_CACHE`` when
set, else in the user's normal linspec cache (see ``tests/conftest.py``), so it is downloaded and dequantised
once per machine. ``HF_HOME`` points at a temp dir and ``HF_HUB_OFFLINE=1`` for the whole suite (conftest).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from linspec.errors import LinspecError
from linspec.sources.demo_models import DEMO_MODELS, _write_marker, demo_model_dir, is_complete
from linspec.sources.loading import check_safetensors, load_source

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
IDS = torch.tensor([[5, 17, 3, 99, 42, 7]])


def tiny_llama(vocab_size: int = 128, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, vocab_size=vocab_size, **overrides)).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture
def tiny_dir(tiny, tmp_path):
    path = tmp_path / "tiny"
    tiny.save_pretrained(path)
    return path


# --- local HF directories -----------------------------------------------------------------------------------
def test_hf_dir_loads_with_identical_logits_in_eval_mode(tiny, tiny_dir):
    model, tokenizer = load_source(str(tiny_dir), progress=False)
    assert type(model) is LlamaForCausalLM and not model.training
    assert tokenizer is None  # the directory has no tokenizer files
    assert torch.equal(logits(model), logits(tiny))
    half, _ = load_source(str(tiny_dir), dtype=torch.bfloat16, progress=False)
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"


def test_sharded_dir_loads_and_a_missing_shard_is_named(tiny, tmp_path):
    path = tmp_path / "sharded"
    tiny.save_pretrained(path, max_shard_size="20KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    model, _ = load_source(str(path), progress=False)
    assert torch.equal(logits(model), logits(tiny))
    shards[1].unlink()
    with pytest.raises(LinspecError) as err:
        load_source(str(path), progress=False)
    assert_one_line(err, shards[1].name, "missing")


def test_truncated_safetensors_is_caught_before_loading(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LinspecError) as err:
        load_source(str(tiny_dir), progress=False)
    assert_one_line(err, str(weights), "truncated")


def test_safetensors_header_garbage_is_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(LinspecError) as err:
        check_safetensors(bad)
    assert_one_line(err, str(bad), "corrupt")
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(LinspecError) as err:
        check_safetensors(bad)
    assert_one_line(err, str(bad))


def test_pickle_only_dir_needs_allow_pickle(tiny, tmp_path):
    path = tmp_path / "pickled"
    tiny.config.save_pretrained(path)
    torch.save(tiny.state_dict(), path / "pytorch_model.bin")  # transformers 5 no longer writes .bin itself
    with pytest.raises(LinspecError) as err:
        load_source(str(path), progress=False)
    assert_one_line(err, "--allow-pickle", str(path))
    model, _ = load_source(str(path), allow_pickle=True, progress=False)
    assert torch.equal(logits(model), logits(tiny))


def test_dir_without_config_or_weights_is_refused(tiny_dir, tmp_path):
    (tiny_dir / "config.json").unlink()
    with pytest.raises(LinspecError) as err:
        load_source(str(tiny_dir))
    assert_one_line(err, "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LinspecError) as err:
        load_source(str(empty))
    assert_one_line(err, "no model weights")


# --- names that are not local models ------------------------------------------------------------------------
def test_missing_path_and_odd_file_are_one_line_errors(tmp_path):
    with pytest.raises(LinspecError) as err:
        load_source(str(tmp_path / "nowhere"))
    assert_one_line(err, "no such file or directory", "smollm2-135m")
    odd = tmp_path / "notes.txt"
    odd.write_text("hello")
    with pytest.raises(LinspecError) as err:
        load_source(str(odd))
    assert_one_line(err, str(odd))


def test_hub_id_offline_is_a_one_line_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: the test must not reach the network
    start = time.perf_counter()
    with pytest.raises(LinspecError) as err:
        load_source("linspec-test-org/no-such-model", progress=False)
    assert_one_line(err, "linspec-test-org/no-such-model", "Hub")
    assert time.perf_counter() - start < 30


# --- GGUF ---------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the vocabulary a "gpt2"-type GGUF tokenizer is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved RoPE halves); transformers undoes it when loading."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def write_tiny_gguf(model: LlamaForCausalLM, path) -> None:
    """Write ``model`` as an F32 llama GGUF with a byte-level BPE tokenizer and a chat template."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = ["<s>", "</s>", "<unk>", "<pad>", *_bytes_to_unicode().values(), "hi"]
    assert len(tokens) == cfg.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 4 + [1] * (len(tokens) - 4))
    writer.add_token_merges(["h i"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_pad_token_id(3)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(_gguf_name(name), _gguf_weight(name, tensor.numpy(), cfg))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if name in fixed or name == "lm_head.weight":
        return fixed.get(name, "output.weight")
    _, _, layer, *module, kind = name.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.{kind}"


def _gguf_weight(name: str, weight: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    if "q_proj" in name:
        weight = _llama_cpp_permute(weight, cfg.num_attention_heads)
    if "k_proj" in name:
        weight = _llama_cpp_permute(weight, cfg.num_key_value_heads)
    return np.ascontiguousarray(weight, dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_llama(vocab_size=261, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(model, path)
    return model, path


def test_gguf_loads_as_a_plain_float_model_that_saves(tiny_gguf, tmp_path):
    original, path = tiny_gguf
    model, tokenizer = load_source(str(path), progress=False)
    assert torch.equal(logits(model), logits(original))
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.decode(tokenizer("hi there ü").input_ids) == "hi there ü"
    model.save_pretrained(tmp_path / "float")  # refused while the model is still flagged as quantized
    tokenizer.save_pretrained(tmp_path / "float")
    again, tokenizer_again = load_source(str(tmp_path / "float"), progress=False)
    assert torch.equal(logits(again), logits(original))
    assert tokenizer_again.chat_template == CHAT_TEMPLATE


def test_garbage_and_truncated_gguf_are_named(tiny_gguf, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(LinspecError) as err:
        load_source(str(garbage))
    assert_one_line(err, str(garbage), "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf[1].read_bytes()[:-1000])
    with pytest.raises(LinspecError) as err:
        load_source(str(truncated))
    assert_one_line(err, str(truncated), "truncated")


# --- the demo model cache -----------------------------------------------------------------------------------
def test_cache_marker_decides_completeness(tmp_path):
    spec = DEMO_MODELS["smollm2-135m"]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    assert not is_complete(tmp_path, spec)  # no marker: an interrupted or foreign directory
    _write_marker(tmp_path, spec)
    assert is_complete(tmp_path, spec)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 50)
    assert not is_complete(tmp_path, spec)  # a file changed size after the build
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    marker = json.loads((tmp_path / "linspec_demo.json").read_text())
    (tmp_path / "linspec_demo.json").write_text(json.dumps({**marker, "version": "0.0.1"}))
    assert not is_complete(tmp_path, spec)  # built from another release of the wheel


def test_demo_model_dir_returns_a_complete_cache_without_downloading(tmp_path, monkeypatch):
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x")
    _write_marker(target, DEMO_MODELS["smollm2-135m"])
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert demo_model_dir("smollm2-135m") == target
    with pytest.raises(LinspecError) as err:
        demo_model_dir("no-such-demo")
    assert_one_line(err, "smollm2-135m")


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"a cached demo model must not start a download: {args}")


@pytest.mark.slow
def test_demo_dir_is_a_complete_float32_copy(demo_model_path):
    assert is_complete(demo_model_path, DEMO_MODELS["smollm2-135m"])
    config = json.loads((demo_model_path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    check_safetensors(demo_model_path / "model.safetensors")
    with open(demo_model_path / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} == {"F32"}
    assert not list(demo_model_path.glob("*.gguf")) and not list(demo_model_path.glob(".*"))


@pytest.mark.slow
def test_demo_model_speaks_english_and_has_a_chat_template(demo_model_path):
    model, tokenizer = load_source("smollm2-135m", progress=False)
    assert type(model) is LlamaForCausalLM and model.config.num_hidden_layers == 30 and not model.training
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert tokenizer.decode(model(ids).logits[0, -1].argmax()) == " Paris"
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris.")
    assert "<|im_start|>" in tokenizer.chat_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_second_demo_load_is_fast_and_offline(demo_model_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    start = time.perf_counter()
    assert demo_model_dir("smollm2-135m", progress=False) == demo_model_path
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    model, _ = load_source("smollm2-135m", progress=False)
    assert time.perf_counter() - start < 15.0  # ~0.3 s here; generous for a busy shared CPU
    assert model.config.vocab_size == 49152


def test_leftovers_of_killed_builds_are_removed(tmp_path):
    from linspec.sources.demo_models import _remove_leftovers

    target = tmp_path / "smollm2-135m"
    for name in (".smollm2-135m.abc.partial", ".smollm2-135m.def.old", ".other.xyz.partial"):
        (tmp_path / name).mkdir()
    _remove_leftovers(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.xyz.partial"]


@pytest.mark.slow
def test_two_processes_build_the_demo_model_once_into_an_empty_cache(tmp_path, demo_model_path):
    """The first run on a new machine: download, dequantise and cache, while a second caller waits for it.

    Both processes start on an empty cache; one builds, the other blocks on the build lock and then finds the
    finished copy. The result must hold the same weights as the copy every other test uses.
    """
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "LINSPEC_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = "from linspec.sources.demo_models import demo_model_dir; print(demo_model_dir('smollm2-135m'))"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, **pipes) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-2000:]
        assert out.strip() == str(tmp_path / "models" / "smollm2-135m")
    assert sum("preparing demo model" in err for _, err in outputs) == 1  # one download, one dequantisation
    built = tmp_path / "models" / "smollm2-135m"
    assert is_complete(built, DEMO_MODELS["smollm2-135m"])
    leftovers = [p.name for p in tmp_path.joinpath("models").iterdir() if p.name.endswith((".partial", ".old"))]
    assert leftovers == []
    ours, reference = load_file(built / "model.safetensors"), load_file(demo_model_path / "model.safetensors")
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[name], reference[name]) for name in ours)
