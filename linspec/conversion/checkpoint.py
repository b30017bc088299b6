"""Checkpoint-level conversion and loading: a model source in, a linspec HF directory out, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from linspec.config import LinspecConfig
from linspec.conversion.card import conversion_card
from linspec.conversion.convert import convert, linspec_classes_for
from linspec.errors import LinspecError
from linspec.utils.io import atomic_directory, check_output_dir
from linspec.utils.paths import refuse_output_over_source


def convert_checkpoint(
    src: str,
    out: str | os.PathLike,
    settings: LinspecConfig,
    *,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "2GB",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Load ``src`` (HF dir, hub id, ``.gguf`` or a demo name), convert it, save model + tokenizer to ``out``.

    ``out`` appears only when everything is written (temp dir, then rename); an existing ``out`` is replaced
    only with ``force``. Checked before loading, so a refused run costs nothing.
    """
    from linspec.sources.loading import load_source

    refuse_output_over_source(out, src, "OUT")
    check_output_dir(out, force)
    _check_config_before_loading(src, settings)
    model, tokenizer = load_source(
        src, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device=device
    )
    converted = convert(model, settings)
    with atomic_directory(out, force=force) as tmp:
        # The conversion's card first: save_pretrained writes a generic one only where there is none. The save
        # writes the weights, config.json with auto_map and the remote code that loads them without linspec.
        conversion_card(
            str(src),
            str(out),
            settings,
            converted,
            dtype=dtype,
            max_shard_size=max_shard_size,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        ).write(tmp)
        converted.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "linspec.json").write_text(
            json.dumps({"source": str(src), "linspec": settings.to_dict(), "dtype": str(dtype)}, indent=2) + "\n"
        )
    return Path(out)


def _check_config_before_loading(src: str, settings: LinspecConfig) -> None:
    """Refuse an unsupported architecture, a bad layer index or sizes past the model's positions from
    ``config.json`` before loading any weight."""
    from linspec.sources.loading import read_config_json

    config_path = Path(src).expanduser() / "config.json"
    if not config_path.is_file():
        return
    data = read_config_json(config_path)
    if "linspec" in data:
        raise LinspecError(f"{src} is already a linspec model; convert its softmax parent instead")
    linspec_classes_for(str(data.get("model_type")))
    if isinstance(data.get("num_hidden_layers"), int) and not isinstance(data["num_hidden_layers"], bool):
        keys = ("num_hidden_layers", "max_position_embeddings", "num_attention_heads", "num_key_value_heads")
        sizes = {key: data.get(key) for key in keys}
        settings.check_model(SimpleNamespace(**sizes))


def load(path: str | os.PathLike, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto"):
    """``(model, tokenizer)`` for any source linspec understands — a converted directory gives a linspec model —
    on ``device`` in ``dtype`` (``auto``: CUDA when present, else CPU; bfloat16 on CUDA, float32 elsewhere)."""
    from linspec.sources.loading import load_source
    from linspec.utils.devices import placement

    target, weights = placement(device, dtype)
    return load_source(str(path), dtype=weights, device=target)
