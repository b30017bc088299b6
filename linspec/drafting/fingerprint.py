"""Which target (and tokenizer) a drafter belongs to: a drafter reads the target's hidden states, so one trained
for another model — even one with the same architecture and vocabulary — drafts garbage without failing."""

from __future__ import annotations

import hashlib
import json

import torch

SAMPLES_PER_TENSOR = 64  # strided values hashed per parameter: cheap, and any trained weight changes some


def target_fingerprint(model) -> dict:
    """Architecture, sizes, linspec layout and a hash of strided samples of every weight.

    Samples are rounded to bfloat16 before hashing, so a target loaded in bf16 matches the same target in fp32.
    """
    config = model.config.get_text_config(decoder=True)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    linspec = getattr(model.config, "linspec", None)
    return {
        "model_type": getattr(model.config, "base_model_type", None) or config.model_type,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "softmax_layers": None if linspec is None else list(linspec.get("softmax_layers", [])),
        # only when present, so the fingerprints of drafters trained before softmax heads existed still match
        **({"softmax_heads": linspec["softmax_heads"]} if linspec and linspec.get("softmax_heads") else {}),
        "weights": digest.hexdigest()[:16],
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (token → id)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def mismatch(expected: dict, actual: dict) -> str | None:
    """The first field where two target fingerprints differ, said in words; None when they match."""
    for key, what in (("vocab_size", "vocabulary size"), ("hidden_size", "hidden size"),
                      ("model_type", "architecture"), ("num_layers", "layer count"),
                      ("softmax_layers", "linear/softmax layout"), ("weights", "weights")):  # fmt: skip
        if expected.get(key) != actual.get(key):
            return f"{what} {expected.get(key)!r} (drafter) vs {actual.get(key)!r} (model)"
    return None
