"""``linspec bench decode`` runs end to end (tiny model, tiny contexts) and reports both models per context.

Speed itself is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import json

from tiny_models import tiny_base

from linspec.bench.decode import DecodeResult, summarise
from linspec.cli import main


def test_bench_decode_measures_both_models_in_separate_processes(tmp_path, capsys):
    tiny_base("llama").save_pretrained(tmp_path / "tiny")
    code = main(["bench", "decode", "--model", str(tmp_path / "tiny"), "--contexts", "16", "40", "--steps", "2",
                 "--no-record"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| 16 ") or line.startswith("| 40 ")]
    assert sorted(row.split("|")[2].strip() for row in rows) == ["converted", "converted", "original", "original"]
    assert "per-token time at 40 vs 16 tokens" in out


def test_summary_ratios_come_from_the_measurements():
    results = [
        DecodeResult("original", 128, 0.1, 10.0, 100.0, 1000, 1),
        DecodeResult("converted", 128, 0.1, 12.0, 83.0, 500, 1),
        DecodeResult("original", 8192, 1.0, 30.0, 33.0, 64000, 1),
        DecodeResult("converted", 8192, 1.0, 12.6, 79.0, 500, 1),
    ]
    summary = summarise(results)
    assert abs(summary["converted_flatness"] - 1.05) < 1e-9
    assert abs(summary["original_growth"] - 3.0) < 1e-9
    assert abs(summary["speedup_by_context"][8192] - 30.0 / 12.6) < 1e-9
    assert summary["cache_ratio_longest"] == 128.0
    assert summary["prefill_ratio_longest"] == 1.0
    json.dumps(summary)  # recorded as JSON


def test_results_go_where_the_user_says_and_never_into_the_package(tmp_path, monkeypatch, capsys):
    import linspec.bench.report as report

    tiny_base("llama").save_pretrained(tmp_path / "tiny")
    args = ["bench", "decode", "--model", str(tmp_path / "tiny"), "--contexts", "8", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "mine")]) == 0
    written = sorted(p.name for p in (tmp_path / "mine").iterdir())
    assert written == ["benchmarks.md", "decode.json", "decode.png"]
    assert json.loads((tmp_path / "mine" / "decode.json").read_text())["device"] == "cpu"
    monkeypatch.chdir(tmp_path)  # default: a fresh run folder under the working directory
    assert main(["bench", "prefill", "--lengths", "8", "--repeats", "1", "--shapes", "smollm2-135m"]) == 0
    (run,) = (tmp_path / "runs" / "bench").iterdir()
    assert run.name.startswith("prefill-") and (run / "prefill.json").is_file()
    assert "wrote" in capsys.readouterr().out
    assert report.project_docs_dir().name == "docs"  # this checkout's recorded tables
    monkeypatch.setattr(report, "_CHECKOUT", tmp_path)  # what an installed package sees
    assert main([*args, "--update-docs"]) == 2
    assert "needs a linspec source checkout" in capsys.readouterr().err


def test_the_converted_model_uses_the_preset_asked_for(tmp_path):
    """The window preset's state holds W − 1 + n raw keys and values per layer on top of the paper's (and the
    ring's room to move along its buffer while decoding): a larger, still constant, cache — the table must time
    the preset it names."""
    from linspec.bench.decode import measure_one
    from linspec.ops.extend import RING_ROOM

    tiny_base("llama").save_pretrained(tmp_path / "tiny")
    paper, window = (measure_one(str(tmp_path / "tiny"), "converted", 12, 1, preset=p) for p in ("paper", "window"))
    extra = 3 * 2 * (512 - 1 + RING_ROOM + 4) * 16 * 2 * 4  # layers × kv heads × entries × head dim × (k, v) × 4
    assert window.cache_bytes - paper.cache_bytes == extra
    longer = measure_one(str(tmp_path / "tiny"), "converted", 40, 1, preset="window")
    assert longer.cache_bytes == window.cache_bytes
    cached, cached_longer = (
        measure_one(str(tmp_path / "tiny"), "converted", n, 1, preset="window", sparse_cache=8) for n in (12, 40)
    )
    assert cached.cache_bytes > window.cache_bytes and cached_longer.cache_bytes == cached.cache_bytes


def test_speculative_bench_rows_for_a_trained_drafter_and_the_only_filter():
    from linspec.bench.speculative import _wanted, settings_for

    rows = settings_for("converted", 24, {"eagle": 5})
    names = {(r.mode, r.name) for r in rows}
    assert {("greedy", "lookup+eagle chain k=5"), ("greedy", "lookup+eagle chain k=5 conf>=0.5")} <= names
    assert ("t=1", "lookup+eagle chain k=5") in names
    assert all(r.drafter.get("lookup_first") for r in rows if r.name.startswith("lookup+"))
    kept = [r for r in rows if _wanted(r, ["lookup+"])]
    assert {r.kind for r in kept if not r.name.startswith("lookup+")} == {"plain-hf"}  # the baselines stay
    assert len([r for r in kept if r.kind == "plain-hf"]) == 2 and [r for r in rows if _wanted(r, None)] == rows


def test_a_batch_decodes_every_row_from_the_repeated_cache(tmp_path, capsys):
    """``--batch B``: one prefilled row's cache repeated to B rows, each with its own state (B times the bytes of
    one row), a step timed over all of them; the table says so and adds the step's time."""
    from linspec.bench.decode import measure_one

    tiny_base("llama").save_pretrained(tmp_path / "tiny")
    for which in ("original", "converted"):
        one, three = (measure_one(str(tmp_path / "tiny"), which, 12, 1, batch=b) for b in (1, 3))
        assert three.batch == 3 and three.cache_bytes == 3 * one.cache_bytes, which
        assert abs(three.ms_per_step - 3 * three.ms_per_token) < 1e-9
    assert main(["bench", "decode", "--model", str(tmp_path / "tiny"), "--contexts", "12", "--steps", "1",
                 "--batch", "2", "--no-record"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| context | model | ms/step | ms/token |" in out and "repeated to 2 rows" in out
    assert main(["bench", "decode", "--model", str(tmp_path / "tiny"), "--batch", "0", "--no-record"]) == 2
    assert "--batch must be between 1 and" in capsys.readouterr().err
