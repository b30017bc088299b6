"""Files and folders linspec writes atomically get the permissions any file the user makes would get (the umask),
not the 0600/0700 of the temporary they were written as; a file it rewrites keeps the permissions it had."""

from __future__ import annotations

import os
import stat

import pytest

from linspec.train.catalog import copy_recipe
from linspec.utils.io import atomic_directory, atomic_write_text


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.usefixtures("umask_022")
def test_new_files_and_folders_follow_the_umask_and_rewrites_keep_their_mode(tmp_path):
    atomic_write_text(tmp_path / "results.json", "{}")
    assert mode(tmp_path / "results.json") == 0o644
    assert mode(copy_recipe("smollm2-135m-demo", tmp_path)) == 0o644
    with atomic_directory(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    assert mode(tmp_path / "model") == 0o755
    (tmp_path / "results.json").chmod(0o640)  # the user's choice for this file
    atomic_write_text(tmp_path / "results.json", '{"a": 1}')
    assert mode(tmp_path / "results.json") == 0o640 and (tmp_path / "results.json").read_text() == '{"a": 1}'


@pytest.mark.usefixtures("umask_022")
def test_a_saved_model_and_checkpoint_are_readable_like_any_file_the_user_makes(tmp_path):
    """The safetensors library writes its files 0600: a converted model, a training checkpoint and a folder made
    inside the output still get the umask's modes, while a mode the writer chose on purpose stays."""
    import torch
    from tiny_models import tiny_base

    from linspec.conversion.convert import convert
    from linspec.train.state import save_checkpoint

    model = convert(tiny_base("llama"))
    with atomic_directory(tmp_path / "model") as folder:
        model.save_pretrained(folder)
        (folder / "sub").mkdir(mode=0o700)
        (folder / "private.txt").write_text("mine")
        (folder / "private.txt").chmod(0o640)
    assert mode(tmp_path / "model" / "model.safetensors") == 0o644
    assert mode(tmp_path / "model" / "sub") == 0o755
    assert mode(tmp_path / "model" / "private.txt") == 0o640
    saved = save_checkpoint(tmp_path / "run", "lora", 1, {"weights": {"w": torch.zeros(2)}}, keep=1)
    assert mode(saved / "state.safetensors") == 0o644
