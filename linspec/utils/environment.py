"""What a bug report needs: the versions linspec runs with, the device, and whether they are the tested set.

``linspec/constraints-cpu.txt`` is the lock: the exact versions the whole test suite passed with on a CPU machine
(``.ci/setup`` installs from it; ``bash .ci/lock`` refreshes it). transformers changes the internals linspec
rides on in minor releases, so "which versions, and are they the tested ones" is the first question about any
problem.

The lock also holds the contributors' tools (the ``dev`` and ``eval`` extras and what they pull in), which a user
install does not have. So "the tested set" means linspec's run-time dependencies: the distributions installed
linspec requires, followed through their own requirements, compared with the lock; the locked tools are reported
on their own line.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

LOCK_FILE = Path(__file__).parents[1] / "constraints-cpu.txt"  # linspec/constraints-cpu.txt

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


def lock_differences(path: Path = LOCK_FILE, only: set[str] | None = None) -> list[tuple[str, str, str | None]]:
    """``(distribution, locked, installed)`` for every locked distribution (of ``only``, canonical names, when
    given) installed at another version or not at all. torch is compared without its build label, and may differ
    on GPU machines by design."""
    differences = []
    for name, locked in read_lock(path).items():
        if only is not None and name not in only:
            continue
        installed = installed_version(name)
        if installed is None or _public(installed) != _public(locked):
            differences.append((name, locked, installed))
    return differences


def runtime_distributions(root: str = "linspec") -> set[str] | None:
    """Canonical names of every distribution ``root`` needs at run time: its requirements without extras, followed
    through the installed distributions' own requirements (with the extras each one asks for), markers evaluated
    for this interpreter. A required distribution that is not installed is included (the lock check names it).
    ``None`` when ``root`` itself is not installed."""
    if installed_version(root) is None:
        return None
    needed: set[str] = set()
    visited: set[tuple[str, str]] = set()
    pending = [(_canonical(root), "")]
    while pending:
        name, extra = pending.pop()
        if (name, extra) in visited:
            continue
        visited.add((name, extra))
        needed.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
                continue
            pending.extend((_canonical(requirement.name), wanted) for wanted in ("", *requirement.extras))
    needed.discard(_canonical(root))
    return needed


def _describe(differences: list[tuple[str, str, str | None]]) -> str:
    return ", ".join(f"{name} {got or 'missing'} (locked {locked})" for name, locked, got in differences)


def lock_status(path: Path = LOCK_FILE) -> dict[str, str]:
    """The ``tested set`` line (linspec's run-time dependencies against the lock) and the ``dev/eval tools`` line
    (the rest of the lock: test, lint and evaluation tools a user install need not have)."""
    if not path.is_file():
        return {"tested set": "unknown (no lock file next to the package)"}
    runtime = runtime_distributions()
    if runtime is None:
        return {"tested set": "unknown (linspec is not installed: no package metadata to read its requirements)"}
    locked = read_lock(path)
    locked_runtime = runtime & locked.keys()
    differences = lock_differences(path, only=locked_runtime)
    if differences:
        tested = f"no: {_describe(differences)}"
    else:
        tested = f"yes: the {len(locked_runtime)} locked run-time dependencies are installed at their locked versions"
    tools = locked.keys() - runtime
    installed_tools = {name for name in tools if installed_version(name) is not None}
    tool_differences = lock_differences(path, only=installed_tools)
    if not installed_tools:
        tool_line = "none installed (extras dev, eval)"
    elif tool_differences:
        tool_line = f"differ from the lock: {_describe(tool_differences)}"
    else:
        tool_line = f"{len(installed_tools)} of {len(tools)} locked tools installed, at their locked versions"
    return {"tested set": tested, "dev/eval tools": tool_line}


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
    report.update(lock_status())
    return report
