"""The files the hostile-input suite feeds linspec: a tiny real model and its conversion, plus corrupt, foreign,
binary, crafted and booby-trapped look-alikes of every kind of file linspec reads.

A crafted pickle here would create ``CANARY`` if it ever ran; the suite asserts it never exists.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml

from linspec.data.corpus import SAMPLE

CANARY = "pwned-by-pickle"


class Booby:
    """Unpickling this runs ``open(path, 'w')``: proof of code execution if the file appears."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class World:
    root: Path
    canary: Path

    def __getitem__(self, name: str) -> str:
        return str(self.root / name)


def evil_pickle(canary: Path) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": Booby(canary)})


def build_world(root: Path) -> World:
    """Write every fixture file under ``root`` (a few MB, about a second)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tiny_models import tiny_base

    from linspec.config import LinspecConfig
    from linspec.conversion.checkpoint import convert_checkpoint
    from linspec.train.tiny import make_tiny_base

    canary = root / CANARY
    base = make_tiny_base(root / "base")
    convert_checkpoint(str(base), root / "linspec", LinspecConfig(group_size=8, conv_taps=4))
    crafted = root / "linspec-crafted"  # a converted model whose config asks for an absurd group size
    shutil.copytree(root / "linspec", crafted)
    settings = json.loads((crafted / "config.json").read_text())
    settings["linspec"]["group_size"] = 10**9
    (crafted / "config.json").write_text(json.dumps(settings))
    small = root / "small-positions"  # 256 positions, no tokenizer
    tiny_base("llama").save_pretrained(small)
    convert_checkpoint(str(small), root / "other-linspec", LinspecConfig(group_size=8, conv_taps=4))  # not from base
    wrong_shape = root / "wrong-shape"  # a base model whose first q_proj has three rows more than its config makes
    shutil.copytree(base, wrong_shape)
    tensors = load_file(wrong_shape / "model.safetensors")
    query = "model.layers.0.self_attn.q_proj.weight"
    tensors[query] = torch.cat([tensors[query], tensors[query][:3]])
    save_file(tensors, wrong_shape / "model.safetensors", metadata={"format": "pt"})
    foreign_tokenizer = root / "foreign-tokenizer"  # 97 embeddings, and the base's 320-token tokenizer beside them
    shutil.copytree(small, foreign_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, foreign_tokenizer / name)
    broken_template = root / "broken-template"  # a converted model whose chat template does not parse
    shutil.copytree(root / "linspec", broken_template)
    (broken_template / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content }}")

    (root / "text.txt").write_text(SAMPLE)
    (root / "one-token.txt").write_text("a")
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbf\n")  # a byte-order mark and nothing else
    (root / "empty.txt").write_bytes(b"")
    (root / "mixed-dir").mkdir()
    (root / "mixed-dir" / "a.txt").write_text("text")
    (root / "mixed-dir" / "b.jsonl").write_text('{"text": "text"}\n')
    (root / "docs.jsonl").write_text('{"body": "one document"}\n')
    (root / "numbers.jsonl").write_text('{"text": "a document"}\n{"text": 5}\n')
    (root / "nulls.jsonl").write_text('{"text": "a document"}\n{"text": null}\n')
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (root / "nul.jsonl").write_bytes(b'{"text": "a"}\n\x00\x00\x00\n')
    (root / "broken.jsonl").write_text('{"text": "unterminated\n{"text": 1}}\n')
    (root / "table.csv").write_text("text\nhello\n")
    (root / "empty-dir").mkdir()

    def model_like(name: str, **files: bytes) -> None:
        folder = root / name
        folder.mkdir()
        for file, data in files.items():
            (folder / file.replace("__", ".")).write_bytes(data)

    weights = (base / "model.safetensors").read_bytes()
    config = (base / "config.json").read_bytes()
    model_like("config-list", config__json=b"[1, 2, 3]", model__safetensors=weights)
    model_like("config-binary", config__json=bytes(range(256)), model__safetensors=weights)
    model_like("config-no-type", config__json=b"{}", model__safetensors=weights)
    torn_config = b'{"model_type": "llama", "num_hidden_layers": NaN'
    model_like("config-torn", config__json=torn_config, model__safetensors=weights)
    model_like("truncated", config__json=config, model__safetensors=weights[: len(weights) // 2])
    model_like("header-bomb", config__json=config, model__safetensors=struct.pack("<Q", 2**62) + b"{}")
    model_like("header-not-json", config__json=config, model__safetensors=struct.pack("<Q", 4) + b"\xff\xfe{[")
    model_like(
        "index-missing-shard",
        config__json=config,
        model__safetensors__index__json=json.dumps({"weight_map": {"a": "model-00001.safetensors"}}).encode(),
    )
    model_like("index-garbage", config__json=config, model__safetensors__index__json=b"\x00garbage")
    model_like("pickle-evil", config__json=config, pytorch_model__bin=evil_pickle(canary))
    model_like("gguf-only", config__json=config, model__gguf=b"GGUF")
    model_like("no-weights", config__json=config)
    gpt2_config = json.dumps({"model_type": "gpt2", "n_layer": 1}).encode()
    model_like("gpt2", config__json=gpt2_config, model__safetensors=weights)
    (root / "fake.gguf").write_bytes(b"NOTGGUF" + b"\0" * 64)
    (root / "truncated.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 12)
    (root / "a-file").write_text("not a directory")
    victim = root / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")

    recipe = {
        "base": str(base),
        "output": str(root / "runs" / "default"),
        "conversion": {"group_size": 8, "conv_taps": 4},
        "data": {"train": ["builtin:sample"], "eval": None, "eval_fraction": 0.25, "seq_len": 32},
        "eval": {"baselines": False},
        "checkpoint": {"every": 1, "keep": 3},
        "stages": [{"kind": "attention_transfer", "steps": 2, "batch_size": 2, "optimizer": {"lr": 0.05}}],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "recipe-scalar.yaml").write_text("just a string\n")
    (root / "recipe-list.yaml").write_text("- base: x\n- stages: []\n")
    (root / "recipe-broken.yaml").write_text("base: [unclosed\n")
    (root / "recipe-binary.yaml").write_bytes(b"\xff\xfe\x00base: x")
    (root / "recipe-huge.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    (root / "recipe-python-tag.yaml").write_text(f"base: !!python/object/apply:os.system ['touch {canary}']\n")
    (root / "recipe-empty.yaml").write_text("")
    shutil.copy(root / "recipe.yaml", root / "recipe-copy.yaml")
    drafter_stage = {"kind": "drafter", "steps": 2, "batch_size": 8,
                     "drafter": {"kind": "medusa", "depth": 2, "draft_vocab": 64,
                                 "data": {"prompts": str(root / "text.txt")}}}  # fmt: skip
    drafter = {"base": str(base), "output": str(root / "runs" / "drafter"), "conversion": None,
               "stages": [drafter_stage]}  # fmt: skip
    (root / "drafter.yaml").write_text(yaml.safe_dump(drafter))
    old_format = {"drafter": {"kind": "medusa", "depth": 2, "draft_vocab": 64}, "target": str(base),
                  "output": str(root / "runs" / "old-drafter"),
                  "data": {"prompts": str(root / "text.txt")}}  # fmt: skip
    (root / "drafter-old-format.yaml").write_text(yaml.safe_dump(old_format))
    _medusa_for(base, root / "drafter-for-base")
    _damaged_models(root, base, root / "linspec")
    _damaged_drafters(base, root)
    return World(root, canary)


def _damaged_models(root: Path, base: Path, converted: Path) -> None:
    """Models whose config and weights disagree, or whose weights or linspec section were edited: each would
    load with at most a warning (random or missing layers, NaN) if nothing checked them."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())

    def variant(name: str, weights: dict | None = None, source: Path = base, **settings) -> None:
        shutil.copytree(source, root / name)
        if weights is not None:
            save_file(weights, str(root / name / "model.safetensors"))
        if settings:
            edited = {**json.loads((source / "config.json").read_text()), **settings}
            (root / name / "config.json").write_text(json.dumps(edited))

    variant("fewer-layers", num_hidden_layers=config["num_hidden_layers"] - 1)
    variant("missing-layer", {k: v for k, v in tensors.items() if ".layers.1." not in k})
    poisoned = dict(tensors)
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    poisoned[name] = poisoned[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    variant("nan-weights", poisoned)
    variant("zero-heads", num_attention_heads=0)
    variant("heads-text", num_attention_heads="4")
    linspec = json.loads((converted / "config.json").read_text())["linspec"]
    for name, section in {
        "linspec-section-list": [1, 2],
        "linspec-group-text": {**linspec, "group_size": "8"},
        "linspec-layers-number": {**linspec, "softmax_layers": 5},
        "linspec-feature-map-list": {**linspec, "feature_map": ["l2norm"]},
    }.items():
        variant(name, source=converted, linspec=section)


def _damaged_drafters(base: Path, root: Path) -> None:
    """Saved drafters with one thing edited: ids outside the vocabulary, NaN, a wrong shape, bad settings."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from linspec.drafting import save_drafter
    from linspec.drafting.store import build

    model = AutoModelForCausalLM.from_pretrained(base)
    good = root / "drafter-reduced"
    save_drafter(build("medusa", model, {"depth": 2, "draft_vocab": 8}, torch.arange(8)), good, model)
    tensors = load_file(str(good / "drafter.safetensors"))

    def variant(name: str, edit_tensors=None, edit_config=None) -> None:
        shutil.copytree(good, root / name)
        if edit_tensors is not None:
            save_file(edit_tensors(dict(tensors)), str(root / name / "drafter.safetensors"))
        if edit_config is not None:
            config = json.loads((good / "drafter.json").read_text())
            edit_config(config)
            (root / name / "drafter.json").write_text(json.dumps(config))

    variant("drafter-ids-out-of-range", lambda t: {**t, "vocab.token_ids": torch.arange(8) + 10**6})
    variant("drafter-ids-repeated", lambda t: {**t, "vocab.token_ids": torch.zeros(8, dtype=torch.long)})
    variant("drafter-ids-float", lambda t: {**t, "vocab.token_ids": torch.arange(8.0)})
    variant("drafter-nan", lambda t: {k: v.clone().fill_(float("nan")) if "blocks" in k else v for k, v in t.items()})
    variant("drafter-shape", lambda t: {**t, "blocks.0.weight": t["blocks.0.weight"][:, :2].contiguous()})
    variant("drafter-depth-text", edit_config=lambda c: c["settings"].update(depth="2"))
    variant("drafter-depth-huge", edit_config=lambda c: c["settings"].update(depth=10**6))
    variant("drafter-settings-list", edit_config=lambda c: c.update(settings=[1]))


def _medusa_for(model_dir: Path, out: Path) -> None:
    """A saved (untrained) Medusa drafter for the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    from linspec.drafting import save_drafter
    from linspec.drafting.store import build

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    save_drafter(build("medusa", model, {"depth": 2}), out, model)
