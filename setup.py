"""Package discovery, which pyproject.toml's ``packages`` table cannot express on its own.

Every package under ``linspec/`` ships without being listed, so a new subpackage cannot be left out of the wheel,
and the two top-level source folders install inside linspec (``kernels/`` as ``linspec.kernels``, ``recipes/`` as
``linspec.recipes``; their ``package-dir`` mapping is in pyproject.toml). ``kernels`` must never install as a
top-level package: PyPI has an unrelated ``kernels`` distribution. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

NESTED_FOLDERS = ("kernels", "recipes")  # top-level folders that install as linspec.<folder>


def discovered_packages() -> list[str]:
    nested = find_packages(include=[pattern for folder in NESTED_FOLDERS for pattern in (folder, f"{folder}.*")])
    return [*find_packages(include=["linspec", "linspec.*"]), *(f"linspec.{name}" for name in nested)]


setup(packages=discovered_packages())
