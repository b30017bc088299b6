"""Where evaluations and benchmarks write: results already in ``--out`` are replaced only with ``--force``, and
every output flag is checked before a model is loaded, so a bad one costs nothing and overwrites nothing."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_base

from linspec.cli import main


def _passkey(model, out, *options):
    return main(["eval", "passkey", str(model), "--lengths", "256", "--trials", "1", "--out", str(out), *options])


def test_an_evaluation_keeps_earlier_results_unless_forced(tiny_bpe_dir, text_file, tmp_path, capsys):
    out = tmp_path / "results"
    assert _passkey(tiny_bpe_dir, out) == 0
    first = (out / "passkey.json").read_bytes()
    capsys.readouterr()
    assert _passkey(tiny_bpe_dir, out) == 2
    err = capsys.readouterr().err
    assert "already holds passkey.json" in err and "pass --force" in err
    assert (out / "passkey.json").read_bytes() == first
    assert _passkey(tiny_bpe_dir, out, "--force") == 0
    assert (out / "passkey.json").read_bytes() != first  # rewritten (its machine summary holds the time)
    # another task's results may join the same folder; so may a recorded table of another name
    plain = ["eval", "ppl", str(tiny_bpe_dir), "--data", str(text_file), "--window", "32", "--out", str(out)]
    assert main([*plain, "--record-bench", "plain-ppl"]) == 0
    assert {"passkey.json", "ppl.json", "plain-ppl.json", "benchmarks.md"} <= {p.name for p in out.iterdir()}
    data = json.loads((out / "ppl.json").read_text())
    assert data["command"].startswith(f"linspec eval ppl {tiny_bpe_dir} --data {text_file} --window 32")
    assert data["variants"]["full"]["tokens"] > 0
    assert "<!-- bench:plain-ppl:begin -->" in (out / "benchmarks.md").read_text()
    capsys.readouterr()
    assert main([*plain, "--record-bench", "passkey"]) == 2  # the recorded table would replace passkey.json
    assert "already holds" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--record-bench", "../escape"], "--record-bench: '../escape' is not a plain name"),
        (["--update-docs"], "add --record-bench NAME"),
        (["--force"], "it needs --out DIR"),
    ],
)
def test_output_flags_are_refused_before_the_model_is_loaded(tmp_path, capsys, options, message):
    missing = tmp_path / "no-model-here"  # loading it would fail with "no such file"
    assert main(["eval", "passkey", str(missing), "--lengths", "256", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "no such" not in err
    assert not (tmp_path / "escape").exists() and not list(tmp_path.iterdir())


def test_an_out_path_that_is_a_file_is_refused_for_eval_and_bench(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["eval", "passkey", str(tmp_path / "m"), "--lengths", "256", "--out", str(notes)]) == 2
    assert main(["bench", "prefill", "--lengths", "8", "--repeats", "1", "--out", str(notes)]) == 2
    assert capsys.readouterr().err.count("exists and is not a folder") == 2 and notes.read_text() == "mine"


def test_a_benchmark_keeps_earlier_results_unless_forced(tmp_path, capsys):
    tiny_base("llama").save_pretrained(tmp_path / "tiny")
    out = tmp_path / "bench"
    decode = ["bench", "decode", "--model", str(tmp_path / "tiny"), "--contexts", "8", "--steps", "1"]
    decode += ["--out", str(out)]
    assert main(decode) == 0
    first = (out / "decode.json").read_bytes()
    capsys.readouterr()
    assert main(decode) == 2
    assert "already holds decode.json" in capsys.readouterr().err and (out / "decode.json").read_bytes() == first
    assert main([*decode, "--force"]) == 0 and (out / "decode.json").read_bytes() != first
    assert main(["bench", "prefill", "--lengths", "8", "--repeats", "1", "--force"]) == 2
    assert "it needs --out DIR" in capsys.readouterr().err
