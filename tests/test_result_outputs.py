"""Where evaluations and benchmarks write: results already in ``--out`` are replaced only with ``--force``, and
every output flag is checked before a model is loaded, so a bad one costs nothing and overwrites nothing."""

from __future__ import annotations

import json

import pytest

from linspec.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_evaluation_keeps_earlier_results_unless_forced(tiny_bpe_dir, text_file, tmp_path, capsys):
    out = tmp_path / "results"
    plain = ["eval", "ppl", str(tiny_bpe_dir), "--data", str(text_file), "--window", "32", "--out", str(out)]
    assert main(plain) == 0
    first = (out / "ppl.json").read_bytes()
    data = json.loads(first)
    assert data["command"].startswith(f"linspec eval ppl {tiny_bpe_dir} --data {text_file} --window 32")
    assert data["variants"]["full"]["tokens"] > 0
    capsys.readouterr()
    assert main(plain) == 2
    err = capsys.readouterr().err
    assert "already holds ppl.json" in err and "pass --force" in err
    assert (out / "ppl.json").read_bytes() == first
    assert main([*plain, "--force", "--record-bench", "plain-ppl"]) == 0
    assert (out / "ppl.json").read_bytes() != first  # rewritten (its machine summary holds the time)
    assert "<!-- bench:plain-ppl:begin -->" in (out / "benchmarks.md").read_text()
    # another task's results may join the folder, but not over a recorded table of the same name
    passkey = ["eval", "passkey", str(tiny_bpe_dir), "--lengths", "256", "--trials", "1", "--out", str(out)]
    capsys.readouterr()
    assert main([*passkey, "--record-bench", "plain-ppl"]) == 2 and "already holds plain-ppl" in capsys.readouterr().err
    assert main(passkey) == 0
    assert {"ppl.json", "passkey.json", "plain-ppl.json", "benchmarks.md"} <= {p.name for p in out.iterdir()}


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
    from argparse import Namespace

    from linspec.bench.report import output_dir

    out = tmp_path / "bench"
    out.mkdir()
    (out / "decode.png").write_bytes(b"an earlier run's plot")
    decode = ["bench", "decode", "--model", str(tmp_path / "no-model"), "--contexts", "8", "--out", str(out)]
    assert main(decode) == 2  # refused before the model is looked at
    err = capsys.readouterr().err
    assert "already holds decode.png" in err and "no such" not in err
    assert (out / "decode.png").read_bytes() == b"an earlier run's plot"
    flags = {"out": str(out), "update_docs": False, "no_record": False}
    assert output_dir(Namespace(**flags, force=True), "decode") == out
    assert output_dir(Namespace(**flags, force=False), "prefill") == out  # another benchmark's results may join
    assert main(["bench", "prefill", "--lengths", "8", "--repeats", "1", "--force"]) == 2
    assert "it needs --out DIR" in capsys.readouterr().err
