"""The steps every loader shares: library errors turned into one line, transformers' progress bars switched off,
the tokenizer loaded, and the model handed back ready (eval mode, on the CPU, in the asked dtype).

Kept apart from the loaders so the GGUF reader (which the demo models build on) and the directory and hub loaders
(which serve the demo models) use the same steps without importing one another.
"""

from __future__ import annotations

import contextlib
import pickle
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from linspec.errors import LinspecError


def load_tokenizer(path: Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path, **kwargs)``, its failures as one line naming the file."""
    from transformers import AutoTokenizer

    with wrap_errors(f"cannot load the tokenizer in {path / kwargs.get('gguf_file', '')}"):
        return AutoTokenizer.from_pretrained(path, **kwargs)


def ready(model: Any, dtype: torch.dtype) -> Any:
    """Eval mode, CPU, ``dtype``: what every caller of ``linspec.sources.loading.load_source`` expects."""
    return model.to(device="cpu", dtype=dtype).eval()


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    """Turn low-level load errors into a one-line LinspecError starting with ``what`` (the cause stays chained).

    A pickle checkpoint (``--allow-pickle``) goes through torch's weights-only unpickler, which refuses any object
    but tensors and plain containers; its refusal is named as such, and its warning about the pickle protocol (a
    pickle ``torch.save`` did not write) stays out of the one line."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            yield
    except LinspecError:
        raise
    except pickle.UnpicklingError as err:
        raise LinspecError(
            f"{what}: its pickle holds objects other than tensors, which linspec does not unpickle (torch's "
            "weights-only loader refused them)"
        ) from err
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, ArithmeticError, struct.error) as err:
        raise LinspecError(f"{what}: {one_line(err)}") from err
    except Exception as err:  # e.g. safetensors' SafetensorError, huggingface_hub's errors
        if type(err).__module__.split(".")[0] in {"safetensors", "huggingface_hub", "tokenizers", "gguf"}:
            raise LinspecError(f"{what}: {one_line(err)}") from err
        raise


def one_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``err``'s message, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def progress_bars(enabled: bool):
    """Hide transformers' (and huggingface_hub's) tqdm bars during a load when ``enabled`` is false."""
    from linspec.models import hf

    return hf.progress_bars(enabled)
