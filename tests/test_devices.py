"""``--device`` / ``--dtype`` and ``linspec.load(path, device=, dtype=)``: placement is checked, plumbed, kept."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_linspec

import linspec
from linspec.cli import main
from linspec.errors import LinspecError
from linspec.utils.devices import placement, resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def linspec_dir(tmp_path_factory):

    path = tmp_path_factory.mktemp("tiny-linspec")
    model = tiny_linspec("llama")
    model.save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(97)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w2", pad_token="w0").save_pretrained(
        path
    )
    return path


def test_auto_picks_cuda_when_present_else_cpu_and_float32_on_cpu():
    device, _ = placement("auto", "auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bf16", device) is torch.bfloat16 and resolve_dtype(torch.float16, device) is torch.float16
    assert resolve_device(torch.device("cpu")).type == "cpu" and resolve_device("meta").type == "meta"


@pytest.mark.parametrize(
    "device, dtype, message",
    [
        ("bogus", "auto", "unknown device 'bogus'"),
        ("tpu", "auto", "unknown device 'tpu'"),
        ("hpu", "auto", "unsupported device 'hpu'"),
        ("cpu", "int8", "dtype must be auto or one of"),
        ("cpu", torch.int8, "dtype must be one of float32"),
    ],
)
def test_bad_placements_are_one_clear_error(device, dtype, message):
    with pytest.raises(LinspecError, match=message):
        placement(device, dtype)


def test_a_missing_gpu_is_named():
    if torch.cuda.is_available():
        assert resolve_device("cuda:0").type == "cuda"
        with pytest.raises(LinspecError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(LinspecError, match="CUDA is not available on this machine"):
            resolve_device("cuda")


def test_load_places_and_casts_and_a_bfloat16_round_trip_keeps_the_weights(linspec_dir, tmp_path):
    model, tokenizer = linspec.load(linspec_dir, device="cpu", dtype="bfloat16")
    assert tokenizer is not None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference, _ = linspec.load(linspec_dir, device="cpu", dtype="float32")
    ids = torch.randint(3, 97, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        low, high = model(ids).logits.float(), reference(ids).logits
    assert (low - high).abs().max() < 0.05 * high.abs().max()  # bf16 weights, fp32 running sums
    model.save_pretrained(tmp_path / "bf16")
    again, _ = linspec.load(tmp_path / "bf16", device="cpu", dtype="bfloat16")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_load_on_the_meta_device_moves_every_weight_without_data(linspec_dir):
    model, _ = linspec.load(linspec_dir, device="meta", dtype="float32")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert type(model).__name__ == "LinspecLlamaForCausalLM"


def test_commands_take_device_and_dtype(linspec_dir, tmp_path, capsys):
    data = linspec_dir / "text.txt"
    data.write_text(" ".join(f"w{i % 90 + 3}" for i in range(300)))
    ppl = ["eval", "ppl", str(linspec_dir), "--data", str(data), "--window", "32", "--out", str(tmp_path / "ppl")]
    assert main([*ppl, "--dtype", "bfloat16"]) == 0
    assert "perplexity" in capsys.readouterr().out
    code = main(["generate", str(linspec_dir), "--prompt", "w5 w6 w7", "--no-chat", "--max-new-tokens", "4",
                 "--device", "cpu", "--dtype", "float32", "--json"])  # fmt: skip
    assert code == 0 and '"texts"' in capsys.readouterr().out
    code = main(["generate", str(linspec_dir), "--prompt", "w5", "--no-chat", "--device", "cuda"])
    if torch.cuda.is_available():
        assert code == 0
    else:
        assert code == 2 and "CUDA is not available" in capsys.readouterr().err
