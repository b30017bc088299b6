"""``linspec --help`` / ``--version`` answer without importing torch or transformers (measured, not timed here:
which modules load is what decides the time), and ``import linspec`` still makes linspec models loadable."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets", "numpy")
PROBE = (
    "import runpy, sys\n"
    "sys.argv = ['linspec', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('linspec', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as stop:\n"
    "    code = stop.code\n"
    "print('LOADED', *sorted(m for m in sys.modules if m in {heavy}), file=sys.stderr)\n"
    "sys.exit(code)\n"
).replace("{heavy}", repr(set(HEAVY)))


def run_probe(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``python -m linspec ARGV`` in a fresh interpreter, and the heavy modules it had imported at exit."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED")]
    assert len(loaded) == 1, done.stderr
    return done, loaded[0].split()[1:]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["nope"]] + [[name, "--help"] for name in ("convert", "generate", "chat", "serve",
                                                                        "train", "eval", "demo", "bench", "env",
                                                                        "recipes")],
    ids=lambda argv: " ".join(argv),
)  # fmt: skip
def test_help_and_version_import_no_heavy_library(argv):
    done, loaded = run_probe(*argv)
    assert done.returncode == (2 if argv == ["nope"] else 0), done.stderr
    assert loaded == [], f"linspec {' '.join(argv)} imported {loaded}"


def test_help_lists_every_command_and_version_prints_it():
    from linspec import __version__
    from linspec.cli import COMMANDS

    done, _ = run_probe("--help")
    for name, _, help_text in COMMANDS:
        assert name in done.stdout and help_text.split()[0] in done.stdout
    done, _ = run_probe("--version")
    assert done.stdout.strip() == f"linspec {__version__}"


def test_the_importtime_log_of_version_names_no_heavy_module():
    """The same check through ``-X importtime``: the interpreter's own record of every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "linspec", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "linspec" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_import_linspec_registers_the_auto_classes_when_transformers_loads(tmp_path):
    """``import linspec`` loads nothing heavy, yet a linspec directory then loads through AutoModelForCausalLM —
    whether transformers comes after linspec, before it, or through a linspec module."""
    from tiny_models import tiny_base

    import linspec

    model = linspec.convert(tiny_base("llama"), linspec.LinspecConfig(group_size=8, conv_taps=4))
    model.save_pretrained(tmp_path / "m")
    load = f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}); print(type(m).__name__)"
    orders = {
        "linspec first": "import linspec, sys; assert 'torch' not in sys.modules; "
        f"from transformers import AutoModelForCausalLM; {load}",
        "transformers first": f"from transformers import AutoModelForCausalLM; import linspec; {load}",
        "through a linspec module": "import linspec; from linspec.sources.loading import load_source; "
        f"from transformers import AutoModelForCausalLM; {load}",
    }
    for name, code in orders.items():
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        assert done.stdout.strip() == "LinspecLlamaForCausalLM", name


def test_without_import_linspec_nothing_is_registered(tmp_path):
    """The registration is linspec's doing: a process that never imports it does not know the type."""
    code = (
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
        "print('linspec_llama' in CONFIG_MAPPING)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False"


def test_convert_help_names_exactly_the_architectures_it_converts():
    """``convert --help`` lists ``BASE_MODEL_TYPES`` (no transformers import); the classes live in ``ARCHITECTURES``."""
    from linspec.config import BASE_MODEL_TYPES
    from linspec.models.modeling import ARCHITECTURES

    assert sorted(BASE_MODEL_TYPES) == sorted(ARCHITECTURES)
