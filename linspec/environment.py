"""What a bug report needs: the versions linspec runs with, the device, and whether they are the tested set.

``linspec/constraints-cpu.txt`` is the lock: the exact versions the whole test suite passed with on a CPU machine
(``.ci/setup`` installs from it; ``bash .ci/lock`` refreshes it). transformers changes the internals linspec
rides on in minor releases, so "which versions, and are they the tested ones" is the first question about any
problem.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path

LOCK_FILE = Path(__file__).with_name("constraints-cpu.txt")

# (distribution, label) shown by ``linspec env``, in this order.
REPORTED = (
    ("linspec", "linspec"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("datasets", "datasets"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("huggingface-hub", "huggingface_hub"),
    ("gguf", "gguf"),
    ("triton", "triton"),
    ("flash-linear-attention", "fla"),
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    """``2.13.0+cpu`` → ``2.13.0``: a local build label does not make a different release."""
    return version.split("+", 1)[0]


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """``{distribution: version}`` from a pip constraints file of ``name==version`` lines."""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.strip()
    return pins


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def lock_differences(path: Path = LOCK_FILE) -> list[tuple[str, str, str | None]]:
    """``(distribution, locked, installed)`` for every locked distribution installed at another version (or not
    at all). torch is compared without its build label, and may differ on GPU machines by design."""
    differences = []
    for name, locked in read_lock(path).items():
        installed = installed_version(name)
        if installed is None or _public(installed) != _public(locked):
            differences.append((name, locked, installed))
    return differences


def device_summary() -> str:
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return f"cuda: {torch.cuda.device_count()} × {', '.join(names)} (CUDA {torch.version.cuda})"
    return f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def environment_report() -> dict[str, str]:
    """Label → value, for ``linspec env`` (and for pasting into a bug report)."""
    report = {"python": platform.python_version(), "platform": platform.platform()}
    for distribution, label in REPORTED:
        report[label] = installed_version(distribution) or "not installed"
    report["device"] = device_summary()
    report["LINSPEC_BACKEND"] = os.environ.get("LINSPEC_BACKEND", "auto")
    differences = lock_differences() if LOCK_FILE.is_file() else None
    if differences is None:
        report["tested set"] = "unknown (no lock file next to the package)"
    elif not differences:
        report["tested set"] = "yes: every locked version is installed"
    else:
        shown = ", ".join(f"{name} {got or 'missing'} (locked {locked})" for name, locked, got in differences)
        report["tested set"] = f"no: {shown}"
    return report
