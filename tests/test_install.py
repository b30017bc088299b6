"""A real (non-editable) install: the wheel carries the recipes, the lock and the kernels, and the CLI works from
it outside a source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_recipes_and_runs_outside_a_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT), "-w",
         str(wheels)],
        check=True, capture_output=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("linspec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert {f"linspec/recipes/{name}" for name in shipped} <= names
    assert {"linspec/constraints-cpu.txt", "linspec/kernels/__init__.py"} <= names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # what pip install puts in site-packages
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def linspec(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "linspec", *args], capture_output=True, text=True, env=env,
                              cwd=elsewhere, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import linspec; print(linspec.__file__)"], capture_output=True,
                           text=True, env=env, cwd=elsewhere, check=True).stdout  # fmt: skip
    assert where.startswith(str(target))
    assert sorted(line.split()[0] for line in linspec("recipes", "ls").splitlines()) == sorted(
        name.removesuffix(".yaml") for name in shipped
    )
    assert "base: smollm2-135m" in linspec("train", "smollm2-135m-demo", "--check")
    assert linspec("--version").startswith("linspec ")
    done = subprocess.run([sys.executable, "-m", "linspec", "bench", "prefill", "--update-docs"], capture_output=True,
                          text=True, env=env, cwd=elsewhere, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "needs a linspec source checkout" in done.stderr
