"""Result folders: every run gets its own, even when runs start in the same second."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from linspec.utils import results


def test_runs_started_in_the_same_second_write_to_different_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(results.time, "strftime", lambda pattern: "eval-20261206-213917")
    name = results.default_out_dir()
    assert not Path("runs").exists()  # naming a folder creates nothing: a refused command leaves none behind
    first, second = results.claim_fresh(name), results.claim_fresh(results.default_out_dir())
    assert (first, second) == (Path("runs/eval-20261206-213917"), Path("runs/eval-20261206-213917-2"))
    results.write_results(first, "ppl-length", {"model": "a"})
    results.write_results(second, "ppl-length", {"model": "b"})
    assert '"model": "a"' in (first / "ppl-length.json").read_text()
    assert '"model": "b"' in (second / "ppl-length.json").read_text()


def test_concurrent_claims_of_one_name_get_one_folder_each(tmp_path):
    with ThreadPoolExecutor(max_workers=8) as pool:
        folders = list(
            pool.map(lambda _: results.claim_fresh(tmp_path / "bench" / "decode-20261206-213917"), range(16))
        )
    assert len(set(folders)) == 16
    assert all(folder.is_dir() for folder in folders)


def test_a_file_in_the_way_is_skipped_not_replaced(tmp_path):
    (tmp_path / "eval-x").write_text("someone's notes")
    folder = results.claim_fresh(tmp_path / "eval-x")
    assert folder == tmp_path / "eval-x-2" and folder.is_dir()
    assert (tmp_path / "eval-x").read_text() == "someone's notes"
