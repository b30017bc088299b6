"""``linspec convert`` end to end on small checkpoints: it works, and bad input gets one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_base
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import linspec  # noqa: F401  (registers the linspec Auto classes)
from linspec.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_base("qwen3", seed=1).save_pretrained(path)
    return path


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2 and exactly one message line (progress bars may precede it on stderr), no traceback."""
    assert code == 2
    messages = [line for line in err.strip().splitlines() if line.startswith("linspec")]
    assert len(messages) == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == messages[0]
    for fragment in fragments:
        assert fragment in messages[0], messages[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_convert_writes_a_loadable_linspec_dir(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("convert", str(tiny_dir), str(out), "--group-size", "8", "--conv-taps", "4",
                              "--softmax-layers", "1", capsys=capsys)  # fmt: skip
    assert code == 0 and "wrote" in stdout and "G=8, P=4" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LinspecQwen3ForCausalLM"
    assert model.config.linspec["group_size"] == 8 and model.config.linspec["softmax_layers"] == [1]
    assert (out / "linspec.json").exists() and leftovers(tmp_path) == []
    ids = torch.randint(3, 97, (1, 12))
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)


def test_convert_says_what_a_layer_without_the_grouped_term_keeps(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("convert", str(tiny_dir), str(out), "--preset", "window-hedgehog", "--local-window",
                              "8", "--sparse-cache", "4", capsys=capsys)  # fmt: skip
    assert code == 0 and "(softmax, window 8 tokens + 4 absolute sinks, far memory hedgehog, sparse cache 4" in stdout
    assert "no grouped term" in stdout and "G=" not in stdout
    assert AutoModelForCausalLM.from_pretrained(out).config.linspec["grouped_term"] is False


def test_existing_output_is_kept_without_force_and_replaced_with_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli("convert", str(tiny_dir), str(out), capsys=capsys)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, err = run_cli("convert", str(tiny_dir), str(out), "--force", capsys=capsys)  # not a model dir
    assert_one_line_error(code, err, "refusing to replace it even with --force")
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "config.json").write_text("{}")  # an earlier model directory: --force replaces it
    code, _, _ = run_cli("convert", str(tiny_dir), str(out), "--force", "--group-size", "8", capsys=capsys)
    assert code == 0 and not (out / "precious.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--group-size", "0"], ["group_size must be an integer in 1.."]),
        (["--conv-taps", "-2"], ["conv_taps must be an integer in 1.."]),
        (["--softmax-layers", "9"], ["out of range"]),
    ],
)
def test_invalid_values_are_one_line_errors(tiny_dir, tmp_path, capsys, extra, fragments):
    code, _, err = run_cli("convert", str(tiny_dir), str(tmp_path / "out"), *extra, capsys=capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_source_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli("convert", str(tmp_path / "nope"), str(tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path, capsys):
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(src)
    code, _, err = run_cli("convert", str(src), str(tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "gpt2", "llama, mistral, qwen2, qwen3")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_truncated_safetensors_is_a_one_line_error(tiny_dir, tmp_path, capsys):
    src = tmp_path / "broken"
    src.mkdir()
    for path in tiny_dir.iterdir():
        data = path.read_bytes()
        (src / path.name).write_bytes(data[: len(data) // 2] if path.suffix == ".safetensors" else data)
    code, _, err = run_cli("convert", str(src), str(tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "safetensors")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_needs_explicit_opt_in(tiny_dir, tmp_path, capsys):
    src = tmp_path / "pickled"
    model = tiny_base("qwen3", seed=1)
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    code, _, err = run_cli("convert", str(src), str(tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "--allow-pickle")
    code, _, _ = run_cli("convert", str(src), str(tmp_path / "out"), "--allow-pickle", "--group-size", "8",
                         capsys=capsys)  # fmt: skip
    assert code == 0 and (tmp_path / "out" / "config.json").exists()


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point, in its own process: exit 2, one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "linspec", "convert", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_every_help_ends_with_an_example(capsys):
    from linspec.cli import COMMANDS

    for command, *_ in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "example:" in capsys.readouterr().out, command


def test_convert_defaults_to_the_window_preset_and_paper_is_one_flag_away(tiny_dir, tmp_path, capsys):
    from linspec.config import PRESETS

    for flags, preset in (([], "window"), (["--preset", "paper"], "paper")):
        out = tmp_path / preset
        code, stdout, _ = run_cli("convert", str(tiny_dir), str(out), *flags, capsys=capsys)
        assert code == 0, stdout
        settings = AutoModelForCausalLM.from_pretrained(out).config.linspec
        assert {key: settings[key] for key in PRESETS[preset]} == PRESETS[preset]
    assert settings["local_kernel"] == "relu2" and "window" not in stdout  # the paper's in-group κ, no window


def test_bench_speculative_refuses_a_converted_target_that_is_not_linspec(tiny_dir, capsys):
    code, _, err = run_cli(
        "bench", "speculative", "--model", str(tiny_dir), "--converted", str(tiny_dir), capsys=capsys
    )
    assert_one_line_error(code, err, "--converted", "not a linspec model")


def test_bench_speculative_with_no_sample_repeats_times_the_greedy_rows_only(tiny_bpe_dir, tiny_dir, capsys):
    """``--sample-repeats 0`` leaves the sampled rows out (they once ran zero times, then divided by their 0 tok/s);
    a model without a tokenizer is refused in one line."""
    code, _, err = run_cli("bench", "speculative", "--model", str(tiny_dir), "--no-record", capsys=capsys)
    assert_one_line_error(code, err, "has no tokenizer")
    code, out, err = run_cli(
        "bench", "speculative", "--model", str(tiny_bpe_dir), "--sample-repeats", "0", "--repeats", "1",
        "--max-new-tokens", "4", "--prompts", "quote", "--only", "lookup", "--targets", "original", "--no-record",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| original |")]
    assert rows and all("| greedy |" in row for row in rows), out
    assert any("lookup" in row for row in rows)


def run_process(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m linspec ARGV`` in its own process, outside any git repository, stderr captured (not a tty)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "linspec", *argv], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


@pytest.mark.parametrize(
    "closed, argv, message",
    [
        (
            0,
            ["generate", "no-model", "--prompt", "-"],
            "linspec generate: error: --prompt - reads stdin, which is closed",
        ),
        (0, ["chat", "no-model"], "linspec chat: error: stdin is closed"),
        (1, ["env"], "linspec env: error: stdout is closed"),
    ],
)
def test_a_closed_stdin_or_stdout_is_one_line_not_a_traceback_or_lost_output(tmp_path, closed, argv, message):
    """Started with a standard stream closed (``<&-``, ``>&-``), Python has ``sys.stdin``/``sys.stdout`` None:
    reading raises deep inside, and print() drops every result without a word."""
    done = subprocess.run(
        [sys.executable, "-m", "linspec", *argv], stderr=subprocess.PIPE, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=lambda: os.close(closed),
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stderr


NOISE = ("Generating train split", "FutureWarning", "fatal: not a git repository", "Traceback", "UserWarning")


def test_a_long_benchmark_shows_progress_on_stderr_and_results_on_stdout(tmp_path):
    """One context (two worker processes): growth with context needs two, so the summary says nothing of it."""
    tiny_base("llama").save_pretrained(tmp_path / "tiny")
    done = run_process("bench", "decode", "--model", str(tmp_path / "tiny"), "--contexts", "12", "--steps", "1",
                       "--no-record", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "decode benchmark" in done.stderr and "2/2" in done.stderr  # every (model, context) run counted
    assert "decode benchmark" not in done.stdout and "| 12 " in done.stdout
    assert "per-token time at" not in done.stdout and "speed-up over the original by context: 12:" in done.stdout
    assert not [word for word in NOISE if word in done.stderr], done.stderr[-2000:]


def test_library_noise_stays_out_of_an_evaluation(tiny_bpe_dir, tmp_path):
    """Reading a local text file through datasets (a fresh cache: its "Generating train split" bar would show)."""
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\n" * 40)
    converted = tmp_path / "converted"
    assert main(["convert", str(tiny_bpe_dir), str(converted), "--group-size", "8"]) == 0  # the setup, in-process
    env_cache = tmp_path / "hf"
    env_cache.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "linspec", "eval", "ppl", str(converted), "--data", str(text), "--window", "32"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(env_cache)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "perplexity" in done.stdout
    assert not [word for word in NOISE if word in done.stderr], done.stderr[-2000:]


def test_recipe_overrides_may_follow_the_options(capsys):
    assert main(["train", "smollm2-135m-demo", "--check", "seed=7", "data.seq_len=96"]) == 0
    resolved = capsys.readouterr().out
    assert "seed: 7" in resolved and "seq_len: 96" in resolved


def test_a_cache_variable_that_names_a_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """``LINSPEC_CACHE`` pointing at a file failed at the first cache write, with "Not a directory: FILE/models"."""
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli("convert", "smollm2-135m", str(tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "LINSPEC_CACHE=", "is a file")
    assert not (tmp_path / "out").exists()
