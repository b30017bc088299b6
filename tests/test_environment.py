"""``linspec env`` and the lock it compares against: the versions a bug report needs, and drift spotted."""

from __future__ import annotations

import json

import torch
import transformers

from linspec.cli import main
from linspec.ops.backend import OPS
from linspec.utils.environment import (
    LOCK_FILE,
    installed_version,
    lock_differences,
    lock_status,
    read_lock,
    runtime_distributions,
)


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
    assert report["dev/eval tools"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = {key: value for key, value in report.items() if key.endswith(f"(window, {device})")}
    window_ops = set(OPS) - {"run_readout"}  # the window preset has no far memory, whose readout is the last op
    assert {key.split()[0] for key in kernels} == window_ops  # where every op of the default preset runs, and why
    assert all(value.startswith(("torch: ", "triton: ")) and len(value) > len("torch: ") for value in kernels.values())
    assert main(["env"]) == 0
    assert "tested set" in capsys.readouterr().out


def test_run_time_dependencies_follow_requirements_but_not_extras():
    needed = runtime_distributions()
    # tokenizers and huggingface-hub come through transformers, not from linspec's own list
    assert {"torch", "transformers", "tokenizers", "huggingface-hub", "safetensors"} <= needed
    tools = {"pytest", "ruff", "lm-eval"}  # the dev and eval extras, installed in this environment
    assert all(installed_version(name) for name in tools)
    assert not needed & tools and "linspec" not in needed
    assert runtime_distributions("linspec-no-such-distribution") is None


def test_the_tested_set_is_the_run_time_dependencies_and_tools_are_reported_apart(tmp_path):
    lock = tmp_path / "lock.txt"
    ours, pytest_version = transformers.__version__, _installed("pytest")
    lock.write_text(f"transformers=={ours}\nsafetensors=={_installed('safetensors')}\npytest==0.0.1\n")
    report = lock_status(lock)
    assert report["tested set"] == "yes: the 2 locked run-time dependencies are installed at their locked versions"
    assert report["dev/eval tools"] == f"differ from the lock: pytest {pytest_version} (locked 0.0.1)"
    lock.write_text(f"transformers==0.0.1\nruff=={_installed('ruff')}\n")
    report = lock_status(lock)
    assert report["tested set"] == f"no: transformers {ours} (locked 0.0.1)"
    assert report["dev/eval tools"] == "1 of 1 locked tools installed, at their locked versions"
    lock.write_text("transformers==0.0.1\nlinspec-no-such-tool==1.0\n")
    assert lock_status(lock)["dev/eval tools"] == "none installed (extras dev, eval)"
    assert lock_status(tmp_path / "absent.txt") == {"tested set": "unknown (no lock file next to the package)"}


def _installed(name: str) -> str:
    from importlib.metadata import version

    return version(name)
