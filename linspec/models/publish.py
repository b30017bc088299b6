"""What a linspec model writes besides weights and config — its model card — and how it goes to the Hub.

``save_pretrained`` writes a card (``README.md``) only where the directory has none: ``linspec convert`` and
``linspec train`` write theirs first (they know the command, the data and the measured quality), and a card a
user edited is never replaced.

``push_to_hub`` is linspec's own because transformers' replaces ``README.md`` with the Hub's card or a generic
template after saving; here the upload is exactly what ``save_pretrained`` writes — weights, config, the
remote-code files, the card — except that a card already in the repository (perhaps edited on the Hub) stays,
as transformers keeps it. Uploads go through ``huggingface_hub``'s public ``HfApi``, so ``HF_ENDPOINT`` and
``HF_TOKEN`` work as they do for every other Hub client.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from linspec.models.cache_size import measured_cache_growth, softmax_cache_growth
from linspec.models.card import REPO_ID, ModelCard, Source, source_license

CARD = "README.md"
# save_pretrained(push_to_hub=True)'s options that describe the upload, not the files (transformers' names).
# A temporary directory of ``linspec.utils.io.atomic_directory`` (``.NAME.HOST-PID.RANDOM.partial``): a card written
# into one names the output it becomes, not itself.
_PARTIAL = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+-\d+\.[^.]+\.partial")
_HUB_OPTIONS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "token", "revision")


def base_model_origin(name_or_path: Any) -> str | None:
    """What a conversion records as its parent: the base's ``name_or_path`` (a hub id or a local path), or None."""
    return name_or_path if isinstance(name_or_path, str) and name_or_path.strip() else None


def model_card(model, location: str):
    """The card of ``model`` as saved to ``location`` (a directory or a repo id): its settings, its parent when the
    config records one, and its decode-cache size measured on the model itself."""
    origin = base_model_origin(getattr(model.config, "base_model_name_or_path", None))
    if origin is None:
        source = Source(given="", repo_id=None, text="a base model this save did not record", license=None)
    elif REPO_ID.fullmatch(origin) and not Path(origin).expanduser().exists():
        source = Source(given=origin, repo_id=origin, text=f"`{origin}`", license=source_license(origin))
    else:
        source = Source(origin, None, f"the local checkpoint `{origin}`", source_license(origin))
    trained = any(
        bool(module.global_scale.detach().any()) or bool(module.conv_weight.detach().any())
        for module in model.linspec_modules()
        if getattr(module, "global_scale", None) is not None
    )
    return ModelCard(
        source=source,
        settings=model.config.linspec_settings,
        location=location,
        training=["γ and the convolution changed after conversion; this save does not record how"] if trained else [],
        cache=measured_cache_growth(model),
        original_cache=softmax_cache_growth(model.config, next(model.parameters()).dtype),
        max_positions=getattr(model.config, "max_position_embeddings", None),
    )


def write_card_if_absent(model, directory: str | os.PathLike, location: str | None = None) -> Path | None:
    """Write ``model``'s card into ``directory`` unless it has one; the path written, or None.

    The card is rendered into a temporary directory and hard-linked into place, so it appears whole or not at
    all and never replaces a card another writer put there meanwhile."""
    directory = Path(directory)
    target = directory / CARD
    if target.exists() or target.is_symlink():
        return None
    if location is None:
        partial = _PARTIAL.fullmatch(directory.name)
        location = str(directory.parent / partial["name"] if partial else directory)
    card = model_card(model, location)
    with tempfile.TemporaryDirectory(prefix=f".{CARD}.", dir=directory) as tmp:
        written = card.write(tmp)
        try:
            os.link(written, target)
        except FileExistsError:
            return None
        except OSError:  # a filesystem without hard links
            if target.exists():
                return None
            os.replace(written, target)
    return target


def _api(token: str | bool | None):
    from huggingface_hub import HfApi

    return HfApi(token=token if isinstance(token, str) else None)


def upload(
    directory: Path,
    files: list[str],
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Commit ``files`` (paths relative to ``directory``) to the model repository ``repo_id``, creating it (and
    the ``revision`` branch) if needed. The card is left out when the repository already has one."""
    from huggingface_hub import CommitOperationAdd

    api = _api(token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if CARD in files and api.file_exists(repo_id, CARD, revision=revision):
        files = [name for name in files if name != CARD]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in files]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload linspec model",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def saved_files(directory: Path) -> dict[str, float]:
    """Every file under ``directory`` (relative path -> modification time)."""
    return {str(path.relative_to(directory)): path.stat().st_mtime for path in directory.rglob("*") if path.is_file()}


def add_card_tags(directory: Path, tags: list[str]) -> None:
    """Add ``tags`` to the card's metadata (``push_to_hub(tags=...)``, and the tags libraries such as peft set on a
    model), as transformers does for its own card."""
    from huggingface_hub import ModelCard

    path = directory / CARD
    card = ModelCard.load(path)
    known = list(card.data.tags or [])
    card.data.tags = known + [tag for tag in tags if tag not in known]
    card.save(path)


def push_to_hub(model, repo_id: str, *, max_shard_size: int | str | None = "50GB", tags=None, **options):
    """``model.push_to_hub(repo_id)``: save into a temporary directory, the card addressed to ``repo_id``, and
    upload all of it."""
    given = [tags] if isinstance(tags, str) else list(tags or [])
    tags = given + [tag for tag in getattr(model, "model_tags", None) or [] if tag not in given]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_card_if_absent(model, directory, location=repo_id)  # first, so save_pretrained keeps it
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        if tags:
            add_card_tags(directory, tags)
        return upload(directory, sorted(saved_files(directory)), repo_id, **options)


def save_and_push(save, directory: str | os.PathLike, **kwargs):
    """``save_pretrained(directory, push_to_hub=True, ...)``: ``save(directory, **rest)``, then upload the files
    it created or changed to ``repo_id`` (default: the directory's name), as transformers does."""
    options = {name: kwargs.pop(name) for name in _HUB_OPTIONS if name in kwargs}
    directory = Path(directory)
    repo_id = options.pop("repo_id", directory.name)
    directory.mkdir(parents=True, exist_ok=True)
    before = saved_files(directory)
    save(directory, **kwargs)
    changed = [name for name, mtime in saved_files(directory).items() if before.get(name) != mtime]
    return upload(directory, sorted(changed), repo_id, **options)
