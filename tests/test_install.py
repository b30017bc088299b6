"""A real (non-editable) install: the wheel carries every package, the recipes, the lock and the kernels, and the
CLI works from it outside a source checkout — training included, which imports the stage modules.

The wheel is extracted into a folder put first on the path of the child processes (what ``pip install`` puts in
site-packages), and the launcher drops the editable install's import hooks so that a module missing from the wheel
cannot be found in the checkout instead. ``.ci/wheel`` goes further: a clean venv, the lock, the README quickstart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Build outputs and environments at the top of a checkout: a stale build/lib would ship into the wheel whatever it
# holds (setuptools packs the whole folder), hiding a package the configuration leaves out.
NOT_SOURCE = ("build", "dist", "*.egg-info", ".venv*", ".git", "runs", "out", ".*cache", "__pycache__")

# Runs the linspec CLI with the editable install's meta-path finder and path hooks removed: it would otherwise
# answer imports of linspec's direct subpackages from the checkout.
LAUNCHER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
if sys.argv[1] == "--where":
    import importlib
    for name in sys.argv[2:]:
        print(importlib.import_module(name).__file__)
else:
    from linspec.cli import main
    sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources alone, as a clean checkout would build it."""
    source = tmp_path_factory.mktemp("source") / "linspec"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source), "-w",
         str(wheels)],
        check=True, capture_output=True, cwd=wheels, timeout=300,
    )  # fmt: skip
    (built,) = wheels.glob("linspec-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(target)  # what pip install puts in site-packages
    return target


@pytest.fixture(scope="module")
def run_installed(site, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, env=env,
                              cwd=elsewhere, timeout=300)  # fmt: skip

    return run


def source_packages() -> set[str]:
    """Every package of the source tree, as the folder it installs to: linspec/ and its subfolders holding an
    __init__.py (the Triton kernels and the recipes included)."""
    return {str(init.parent.relative_to(ROOT).as_posix()) for init in (ROOT / "linspec").rglob("__init__.py")}


def test_the_wheel_ships_every_package_and_no_stray_top_level_package(wheel):
    names = [PurePosixPath(name) for name in zipfile.ZipFile(wheel).namelist()]
    shipped = {str(name.parent) for name in names if name.name == "__init__.py"}
    expected = source_packages()
    assert {"linspec/train/stages", "linspec/ops/triton", "linspec/recipes"} <= expected  # the walk finds them
    assert shipped == expected, f"missing from the wheel: {expected - shipped}; not in the source: {shipped - expected}"
    top_level = {name.parts[0] for name in names}
    assert top_level == {"linspec", wheel.name.split("-py")[0] + ".dist-info"}, top_level


def test_the_wheel_ships_recipes_and_runs_outside_a_checkout(wheel, site, run_installed):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "linspec" / "recipes").glob("*.yaml")}
    assert {f"linspec/recipes/{name}" for name in shipped} <= names
    assert {"linspec/constraints-cpu.txt", "linspec/ops/triton/__init__.py"} <= names

    def linspec(*args: str) -> str:
        done = run_installed(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = run_installed("--where", "linspec", "linspec.train.stages", "linspec.ops.triton", "linspec.recipes")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.splitlines()), where.stdout
    assert sorted(line.split()[0] for line in linspec("recipes", "ls").splitlines()) == sorted(
        name.removesuffix(".yaml") for name in shipped
    )
    assert "base: smollm2-135m" in linspec("train", "smollm2-135m-demo", "--check")
    assert linspec("--version").startswith("linspec ")
    done = run_installed("bench", "prefill", "--update-docs")
    assert done.returncode == 2 and "needs a linspec source checkout" in done.stderr


def test_training_runs_from_the_wheel(run_installed):
    """--dry-run imports every stage module and runs each stage for 2 steps on a tiny model (--check does not)."""
    done = run_installed("train", "smollm2-135m-demo", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "dry run passed: 2 stage(s)" in done.stdout
