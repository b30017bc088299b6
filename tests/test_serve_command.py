"""``linspec serve`` without vLLM and with bad inputs: one line and exit 2 from the real command line, and the
vLLM command and environment it would start, built from real flags. The server itself runs in tests_vllm/, in
an environment that has vLLM (``bash .ci/vllm``)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from linspec.cli import build_parser
from linspec.errors import LinspecError
from linspec.serving.launch import (
    DEFAULT_CPU_STATE_GIB,
    SERVER_MODULE,
    ServerOptions,
    VllmInstall,
    server_command,
    server_environment,
)

CPU_BUILD = VllmInstall("vllm-cpu", "0.32.0")
CUDA_BUILD = VllmInstall("vllm", "0.32.1")


def vllm_installed() -> bool:
    for distribution in ("vllm", "vllm-cpu"):
        try:
            metadata.version(distribution)
            return True
        except metadata.PackageNotFoundError:
            continue
    return False


@pytest.fixture(scope="module")
def linspec_dir(tmp_path_factory) -> Path:
    """A tiny converted model, saved as linspec saves every model."""
    from tiny_models import tiny_linspec

    path = tmp_path_factory.mktemp("serve") / "tiny-linear"
    tiny_linspec("llama").save_pretrained(path)
    return path


def serve(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``linspec serve ARGV`` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "linspec", "serve", *argv], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def assert_one_line_refusal(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("linspec serve: error: "), done.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here: the server is tested in tests_vllm/")
def test_without_vllm_serve_says_how_to_install_it(linspec_dir, tmp_path):
    done = serve(str(linspec_dir), "--port", "8123", cwd=tmp_path)
    assert_one_line_refusal(done, "vLLM is not installed")
    assert "pip install 'linspec[vllm]'" in done.stderr


def write(path: Path, files: dict[str, str | bytes]) -> Path:
    path.mkdir()
    for name, content in files.items():
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "is not a directory"),
        ("a file", "is not a directory"),
        ("no config", "has no config.json"),
        ("config not JSON", "is not readable JSON"),
        ("softmax model", "is not a linspec model"),
        ("no weights", "has no weights"),
    ],
)
def test_a_model_that_is_not_a_linspec_directory_is_refused_in_one_line(case, fragment, linspec_dir, tmp_path):
    config = (linspec_dir / "config.json").read_text()
    models = {
        "missing": lambda: tmp_path / "none",
        "a file": lambda: write(tmp_path / "d", {"f": "x"}) / "f",
        "no config": lambda: write(tmp_path / "d", {"model.safetensors": b"x"}),
        "config not JSON": lambda: write(tmp_path / "d", {"config.json": "{", "model.safetensors": b"x"}),
        "softmax model": lambda: write(
            tmp_path / "d", {"config.json": json.dumps({"model_type": "llama"}), "model.safetensors": b"x"}
        ),
        "no weights": lambda: write(tmp_path / "d", {"config.json": config}),
    }
    assert_one_line_refusal(serve(str(models[case]()), cwd=tmp_path), fragment)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--port", "70000"], "--port"),
        (["--max-concurrency", "-1"], "--max-concurrency"),
        (["--dtype", "int8"], "--dtype"),
        (["--device", "cuda:x"], "--device"),
        (["--max-model-len", "2048"], "vLLM's own flags go after --"),
        (["--", "--port", "9000"], "--port after --"),
        (["--", "--served-model-name=x"], "give --name before --"),
        (["--", "--model", "other"], "give MODEL before --"),
    ],
)
def test_bad_flags_are_refused_in_one_line_before_vllm_is_looked_for(flags, fragment, linspec_dir, tmp_path):
    assert_one_line_refusal(serve(str(linspec_dir), *flags, cwd=tmp_path), fragment)


def test_help_names_the_install_the_state_size_and_the_pass_through(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "linspec", "serve", "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "pip install 'linspec[vllm]'" in text and "[-- VLLM_FLAGS ...]" in text
    assert f"VLLM_CPU_KVCACHE_SPACE (GiB of state pages) defaults to {DEFAULT_CPU_STATE_GIB}" in text


def test_words_after_double_dash_go_to_vllm_untouched_and_linspec_flags_stay_linspec_s(linspec_dir):
    argv = ["serve", str(linspec_dir), "--port", "9000", "--", "--max-model-len", "2048", "--", "--port=1"]
    args = build_parser().parse_args(argv)
    assert (args.model, args.port, args.vllm_args) == (
        str(linspec_dir),
        9000,
        ["--max-model-len", "2048", "--", "--port=1"],
    )
    args = build_parser().parse_args(["serve", "--max-concurrency", "3", str(linspec_dir)])
    assert (args.max_concurrency, args.vllm_args, args.host) == (3, [], "127.0.0.1")


def test_the_server_command_runs_vllms_openai_module_with_the_flags_then_the_pass_through(linspec_dir):
    options = ServerOptions(port=9000, max_concurrency=16, vllm_args=("--max-model-len", "4096"))
    command = server_command("/py", str(linspec_dir), options, CPU_BUILD)
    assert command == [
        "/py", "-m", SERVER_MODULE, "--model", str(linspec_dir.resolve()), "--served-model-name", linspec_dir.name,
        "--host", "127.0.0.1", "--port", "9000", "--dtype", "float32", "--max-num-seqs", "16",
        "--max-model-len", "4096",
    ]  # fmt: skip
    on_gpu = server_command("/py", str(linspec_dir), ServerOptions(name="m", dtype="bf16"), CUDA_BUILD)
    assert on_gpu[on_gpu.index("--served-model-name") + 1] == "m" and on_gpu[on_gpu.index("--dtype") + 1] == "bfloat16"
    assert "--max-num-seqs" not in on_gpu
    assert server_command("/py", str(linspec_dir), ServerOptions(), CUDA_BUILD)[-1] == "auto"  # vLLM's own choice


def test_the_environment_sizes_the_cpu_state_pages_unless_the_user_did_and_keeps_the_plugin_allowed():
    assert server_environment({}, ServerOptions(), CPU_BUILD) == {"VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_CPU_STATE_GIB)}
    assert (
        server_environment({"VLLM_CPU_KVCACHE_SPACE": "1"}, ServerOptions(), CPU_BUILD)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    )
    sized = ServerOptions(vllm_args=("--kv-cache-memory-bytes=2G",))
    assert "VLLM_CPU_KVCACHE_SPACE" not in server_environment({}, sized, CPU_BUILD)
    assert server_environment({}, ServerOptions(), CUDA_BUILD) == {}
    assert server_environment({"VLLM_PLUGINS": "other"}, ServerOptions(), CUDA_BUILD)["VLLM_PLUGINS"] == "other,linspec"
    assert server_environment({}, ServerOptions(device="cuda:1"), CUDA_BUILD) == {"CUDA_VISIBLE_DEVICES": "1"}


@pytest.mark.parametrize(("device", "install"), [("cuda", CPU_BUILD), ("cpu", CUDA_BUILD)])
def test_a_device_the_installed_vllm_build_cannot_use_is_refused(device, install):
    with pytest.raises(LinspecError, match=f"--device {device} needs vLLM's"):
        server_environment({}, ServerOptions(device=device), install)
