"""``linspec env`` and the lock it compares against: the versions a bug report needs, and drift spotted."""

from __future__ import annotations

import json

import transformers

from linspec.cli import main
from linspec.environment import LOCK_FILE, lock_differences, read_lock


def test_the_lock_pins_the_transformers_this_suite_runs_with_or_says_it_does_not(tmp_path):
    pins = read_lock()
    assert "transformers" in pins and "torch" in pins and "linspec" not in pins
    differences = {name for name, _, _ in lock_differences()}
    assert ("transformers" in differences) == (pins["transformers"] != transformers.__version__)


def test_a_foreign_lock_is_reported_package_by_package(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(f"# comment\ntransformers==0.0.1\nTorch==99.0+cpu\nsafetensors=={_installed('safetensors')}\n")
    found = {name: (locked, got) for name, locked, got in lock_differences(lock)}
    assert found["transformers"] == ("0.0.1", transformers.__version__)
    assert found["torch"][0] == "99.0+cpu" and "safetensors" not in found


def test_env_command_prints_versions_device_and_lock_status(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformers"] == transformers.__version__
    assert report["device"].startswith(("cpu:", "cuda:"))
    assert report["tested set"].startswith(("yes", "no:")) and LOCK_FILE.is_file()
    assert main(["env"]) == 0
    assert "tested set" in capsys.readouterr().out


def _installed(name: str) -> str:
    from importlib.metadata import version

    return version(name)
