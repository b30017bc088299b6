"""Load a pretrained causal LM from wherever the user points: a HF directory, a ``.gguf`` file, a hub id or a demo.

Every failure a user can cause (a typo, a truncated download, a pickle checkpoint, no network) becomes a
one-line :class:`~linspec.errors.LinspecError` naming the file, checked up front where it is cheap, so that
nobody has to read a traceback from deep inside safetensors or transformers.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from linspec.errors import LinspecError
from linspec.sources.demo_models import DEMO_MODELS, demo_model_dir
from linspec.sources.gguf import load_gguf
from linspec.sources.load_steps import load_tokenizer, one_line, progress_bars, ready, wrap_errors
from linspec.utils.devices import resolve_device

__all__ = ["check_model_dir", "check_safetensors", "load_model_dir", "load_source", "read_config_json"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip


def load_source(
    src: str,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a demo name, a ``.gguf`` file, a HF model directory or a hub id ``org/name``.

    The model is in eval mode, in ``dtype``, on ``device`` (a name ``linspec.utils.devices.resolve_device`` accepts;
    None: the CPU). The tokenizer is ``None`` when a local directory has none. A demo name wins over a local path
    spelled the same; write ``./smollm2-135m`` to mean the directory.
    """
    target = None if device is None else resolve_device(device)  # a missing GPU is refused before loading
    model, tokenizer = _load_on_cpu(
        str(src), dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress
    )
    if tokenizer is not None:
        _check_tokenizer_fits(model, tokenizer, src)
    if target is not None and target.type != "cpu":
        model = model.to(target)
    return model, tokenizer


def _check_tokenizer_fits(model: Any, tokenizer: Any, src: str) -> None:
    """Refuse a tokenizer whose base vocabulary is larger than the model's embedding table (a tokenizer copied in
    from another model): ordinary text would encode to ids past the table and fail deep inside the embedding
    lookup, in whichever command ran first. Added special tokens are not counted: a converted tokenizer may carry
    one the model never sees (a GGUF file's, for one)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(rows, int) and isinstance(size, int) and size > rows:
        raise LinspecError(
            f"{src}: its tokenizer has {size} tokens, more than the model's {rows} embeddings; the tokenizer "
            "belongs to another model"
        )


def _load_on_cpu(
    src: str, *, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool, progress: bool
) -> tuple[Any, Any]:
    if not src.strip():
        raise LinspecError("the model source is empty; give a directory, a .gguf file, a demo name or a hub id")
    if src in DEMO_MODELS:
        return load_model_dir(demo_model_dir(src, progress=progress), dtype=dtype, progress=progress)
    path = Path(src).expanduser()
    if path.is_dir():
        return load_model_dir(
            path, dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return load_gguf(path, dtype=dtype, progress=progress)
    if path.exists():
        raise LinspecError(f"{src} is neither a model directory nor a .gguf file")
    if looks_like_hub_id(src):
        return load_hub(src, dtype=dtype, trust_remote_code=trust_remote_code, progress=progress)
    demos = ", ".join(sorted(DEMO_MODELS))
    raise LinspecError(
        f"{src}: no such file or directory (expected a model directory, a .gguf file, a hub id org/name "
        f"or a demo name: {demos})"
    )


def looks_like_hub_id(src: str) -> bool:
    """Whether a source that is not a local file should go to the Hub: ``org/name``, and ``org`` is not a local
    directory — ``out/model-typo`` is a mistyped local path, not a repository to retry for a minute."""
    if not _HUB_ID.fullmatch(src) or src.startswith((".", "~")) or src.lower().endswith((".gguf", ".safetensors")):
        return False
    return not Path(src.split("/", 1)[0]).exists()


def read_config_json(path: Path) -> dict[str, Any]:
    """A model's ``config.json`` as a dict; anything else (invalid JSON, a list, binary) is one clear error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LinspecError(f"{path} is not valid JSON ({one_line(error)})") from None
    if not isinstance(data, dict):
        raise LinspecError(f"{path} holds a JSON {type(data).__name__}, not an object; it is not a model config")
    return data


def load_model_dir(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Validate a local HF directory (see :func:`check_model_dir`), then load model and (optional) tokenizer."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_model_dir(path, allow_pickle=allow_pickle)
    with wrap_errors(f"cannot load the model in {path}"), progress_bars(progress):
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **_REPORT_MISMATCHES
        )
    check_loaded_weights(model, info, path)
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return ready(model, dtype), tokenizer


# Load tensors of the wrong shape as a report instead of an exception: transformers' exception points at a report
# printed above it (hidden with its logging), while ``check_loaded_weights`` names the tensor and both shapes.
_REPORT_MISMATCHES = {"ignore_mismatched_sizes": True}

_LOADING_PROBLEMS = (
    ("missing_keys", "lacks"),
    ("unexpected_keys", "holds tensors its config.json has no place for, e.g."),
    ("mismatched_keys", "holds tensors of another shape than its config.json makes, e.g."),
    ("error_msgs", "could not load"),
)


def check_loaded_weights(model: Any, info: dict[str, Any], source: str | Path) -> None:
    """Refuse a model whose weights do not match its config — missing tensors (transformers would initialise them
    at random), tensors no layer takes (a config with fewer layers than its weights), tensors of another shape —
    or hold NaN or inf. Each of these loads with at most a warning and generates different text."""
    for kind, what in _LOADING_PROBLEMS:
        found = sorted(_loading_problem(entry) for entry in (info.get(kind) or ()))
        if found:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise LinspecError(f"{source}: the weights do not match config.json: it {what} {found[0][:120]}{more}")
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise LinspecError(f"{source}: weight {name} holds non-finite values (NaN or inf)")


def _loading_problem(entry: Any) -> str:
    """One entry of transformers' loading info as text: a key, or ``(key, stored shape, expected shape)``."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, stored, expected = entry
        return f"{key} (stored {list(stored)}, config.json makes {list(expected)})"
    return str(entry)


def check_model_dir(path: Path, *, allow_pickle: bool = False) -> None:
    """Refuse a directory that cannot load, before transformers turns it into a long traceback.

    Checks: a ``config.json``; every safetensors file the index names exists and has a header whose tensors
    fit in the file (a truncated download is caught here); pickle-only checkpoints need ``allow_pickle``.
    """
    if not (path / "config.json").is_file():
        raise LinspecError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    config = read_config_json(path / "config.json")
    if not isinstance(config.get("model_type"), str):
        raise LinspecError(f"{path / 'config.json'} names no model_type, so it is not a model config")
    check_config_sizes(config, path / "config.json")
    safetensors = _safetensors_files(path)
    if safetensors:
        for file in safetensors:
            check_safetensors(file)
        return
    if any(path.glob("*.bin")) or any(path.glob("*.bin.index.json")):
        if not allow_pickle:
            raise LinspecError(
                f"{path} holds only pickle (.bin) weights, which can run code when loaded; "
                "pass --allow-pickle (allow_pickle=True) if you trust them"
            )
        return
    if any(path.glob("*.gguf")):
        raise LinspecError(f"{path} holds no safetensors weights, only GGUF; pass the .gguf file itself")
    raise LinspecError(f"{path} holds no model weights (*.safetensors)")


# Sizes a config.json states, with bounds far above any released model: zero heads divide by zero inside
# transformers, and an absurd size allocates before any weight is read.
_CONFIG_SIZES = {
    "num_hidden_layers": 4096, "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 1 << 14,
    "hidden_size": 1 << 18, "intermediate_size": 1 << 20, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 24,
}  # fmt: skip


def check_config_sizes(config: dict[str, Any], where: str | Path) -> None:
    """Every size ``config`` states (top level, or its ``text_config``) is an integer in its range."""
    from linspec.utils.validation import check_count

    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key, limit in _CONFIG_SIZES.items():
            if section.get(key) is not None:
                check_count(section[key], f"{where}: {key}", 1, limit)


def _safetensors_files(path: Path) -> list[Path]:
    """The files a sharded index names (missing ones included, to be reported), else every ``*.safetensors``."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not indexes:
        return sorted(path.glob("*.safetensors"))
    files: set[str] = set()
    for index in indexes:
        try:
            files.update(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise LinspecError(f"{index} is not a valid safetensors index ({one_line(err)})") from err
    return [path / name for name in sorted(files)]


def check_safetensors(file: Path) -> None:
    """Parse ``file``'s header and check every tensor's byte range lies inside the file."""
    if not file.is_file():
        raise LinspecError(f"{file} is missing (named in the safetensors index)")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise LinspecError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise LinspecError(f"{file} is truncated or not a safetensors file (header runs past the end)")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError) as err:
            raise LinspecError(f"{file} has a corrupt safetensors header ({one_line(err)})") from err
    if not isinstance(header, dict):
        raise LinspecError(f"{file} has a corrupt safetensors header")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name != "__metadata__":
            _check_tensor_entry(file, name, info, data_size)


def _check_tensor_entry(file: Path, name: str, info: Any, data_size: int) -> None:
    try:
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(x) for x in info["shape"]]
        dtype = str(info["dtype"])
    except (TypeError, KeyError, ValueError) as err:
        raise LinspecError(f"{file} has a corrupt safetensors header entry for {name!r}") from err
    if end > data_size:
        raise LinspecError(
            f"{file} is truncated: tensor {name!r} ends at byte {end} of the data but only {data_size} are present"
        )
    itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
    if begin < 0 or begin > end or (itemsize is not None and end - begin != math.prod(shape) * itemsize):
        raise LinspecError(f"{file} has a corrupt safetensors header: tensor {name!r} has inconsistent offsets")


def load_hub(
    repo_id: str, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False, progress: bool = True
) -> tuple[Any, Any]:
    """Load ``org/name`` from the Hugging Face Hub (or its local cache when offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    what = f"cannot load {repo_id!r} from the Hugging Face Hub"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        what += " (HF_HUB_OFFLINE is set, so only its local cache is searched)"
    with wrap_errors(what), progress_bars(progress):
        model, info = AutoModelForCausalLM.from_pretrained(
            repo_id, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True, **_REPORT_MISMATCHES
        )
    check_loaded_weights(model, info, repo_id)
    try:
        with progress_bars(progress):
            tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code)
    except OSError:  # the repository has no tokenizer
        tokenizer = None
    return ready(model, dtype), tokenizer
