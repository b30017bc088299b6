"""A trained drafter on disk: ``drafter.json`` (kind, settings, the target's and the tokenizer's fingerprints,
how it was trained) and ``drafter.safetensors`` (its own weights and draft-vocabulary ids). The target's
embeddings and head are not stored: they are taken from the target at load time, which is why a drafter only
loads against the target it was trained for. Written atomically; read without unpickling anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from linspec.drafting.base import TrainedDrafter
from linspec.drafting.eagle import EagleDrafterModule
from linspec.drafting.fingerprint import mismatch, target_fingerprint, tokenizer_fingerprint
from linspec.drafting.heads import MedusaHeads
from linspec.drafting.redrafter import RecurrentDrafterModule
from linspec.errors import LinspecError
from linspec.utils.io import atomic_directory

KINDS: dict[str, type[TrainedDrafter]] = {m.kind: m for m in (MedusaHeads, EagleDrafterModule, RecurrentDrafterModule)}
FORMAT = {"format": "linspec-drafter", "version": 1}
CONFIG, WEIGHTS = "drafter.json", "drafter.safetensors"
MAX_CONFIG_BYTES = 1 << 20


def build(kind: str, target, settings: dict, token_ids: torch.Tensor | None = None) -> TrainedDrafter:
    if kind not in KINDS:
        raise LinspecError(f"unknown drafter kind {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind](target, settings, token_ids)


def save_drafter(
    module: TrainedDrafter, path: str | os.PathLike, target, tokenizer=None, training: dict | None = None,
    force: bool = False, card: str | None = None,
) -> Path:  # fmt: skip
    """Write ``module`` as a drafter directory for ``target`` (and ``tokenizer``'s vocabulary); ``card``, the
    directory's ``README.md``, is rendered by whoever trained it (``linspec.train.cards.drafter_card``)."""
    from safetensors.torch import save_file

    config = {
        **FORMAT,
        "kind": module.kind,
        "settings": module.settings,
        "target": target_fingerprint(target),
        "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "training": training or {},
    }
    tensors = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    with atomic_directory(path, force=force, markers=(CONFIG,)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(path)


def read_config(path: str | os.PathLike) -> dict:
    """``drafter.json`` of a drafter directory, checked; every problem is one ``LinspecError``."""
    folder = Path(path)
    if not folder.is_dir():
        raise LinspecError(f"drafter {path}: no such directory")
    file = folder / CONFIG
    if not file.is_file():
        raise LinspecError(f"drafter {path}: no {CONFIG} (not a drafter directory; train one with linspec train)")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise LinspecError(f"drafter {path}: {CONFIG} is too large to be a drafter config")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise LinspecError(f"drafter {path}: {CONFIG} is not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or any(config.get(k) != v for k, v in FORMAT.items()):
        raise LinspecError(f"drafter {path}: {CONFIG} does not say {FORMAT}")
    if config.get("kind") not in KINDS:
        raise LinspecError(f"drafter {path}: unknown kind {config.get('kind')!r}; known: {', '.join(KINDS)}")
    if not isinstance(config.get("settings"), dict) or not isinstance(config.get("target"), dict):
        raise LinspecError(f"drafter {path}: {CONFIG} lacks its settings or target")
    return config


def check_target(config: dict, path, target, tokenizer=None) -> None:
    """Refuse a drafter trained for another target or tokenizer, saying what differs."""
    problem = mismatch(config["target"], target_fingerprint(target))
    if problem:
        raise LinspecError(f"drafter {path} was trained for another target: {problem}")
    expected = config.get("tokenizer")
    if tokenizer is not None and expected is not None and expected != tokenizer_fingerprint(tokenizer):
        raise LinspecError(f"drafter {path} was trained with another tokenizer (vocabulary hash differs)")


def load_drafter(path: str | os.PathLike, target, tokenizer=None) -> TrainedDrafter:
    """The trained drafter in ``path``, bound to ``target`` (refused if trained for another one), in eval mode on
    the target's device and dtype. ``module.drafter(num_tokens, tree_width)`` makes the ``Drafter``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from linspec.sources.loading import check_safetensors

    config = read_config(path)
    check_target(config, path, target, tokenizer)
    weights = Path(path) / WEIGHTS
    check_safetensors(weights)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LinspecError(f"drafter {path}: {WEIGHTS}: {str(error).splitlines()[0]}") from None
    broken = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise LinspecError(f"drafter {path}: {WEIGHTS} holds non-finite values (NaN or inf) in {broken[0]}")
    try:
        module = build(config["kind"], target, config["settings"], tensors.get("vocab.token_ids"))
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except LinspecError as error:
        raise LinspecError(f"drafter {path}: {error}") from None
    except RuntimeError as error:  # a tensor of another shape than its settings make
        problem = str(error).strip().splitlines()[-1].strip()[:160]
        raise LinspecError(f"drafter {path}: {WEIGHTS} does not match its {CONFIG} ({problem})") from None
    if missing or unexpected:
        raise LinspecError(f"drafter {path}: {WEIGHTS} does not match its {CONFIG} ({(missing or unexpected)[0]})")
    head = target.get_output_embeddings().weight
    return module.to(device=head.device, dtype=head.dtype).eval().requires_grad_(False)
