"""The lm-evaluation-harness adapter: its three request types against direct computations, a local YAML task
end to end (no hub), the harness CLI entry point with ``--model linspec``, and the harness's own ``lm_eval``
command loading a linspec directory through its remote code (``--model hf``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from linspec.cli import main
from linspec.evaluation.harness import LinspecLM

ROWS = [
    {"question": "The river was high after the spring", "choices": [" rain", " compiler", " budget"], "answer": 0},
    {"question": "Water boils at one hundred degrees", "choices": [" Celsius", " apples", " Tuesday"], "answer": 0},
    {"question": "The committee met on", "choices": [" Tuesday", " water", " the"], "answer": 0},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Small forwards on a shared 2-core machine: one thread each."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from linspec.train.tiny import make_tiny_base

    base = make_tiny_base(tmp_path_factory.mktemp("harness") / "base", num_layers=2)
    out = base.parent / "linear"
    assert main(["convert", str(base), str(out), "--group-size", "8", "--conv-taps", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task over a local jsonl file: what the harness reads, with no dataset hub."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "tiny.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'tiny.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return LinspecLM(pretrained=str(tiny_dir), max_length=64)


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_equals_a_direct_forward(lm):
    (logprob, greedy), (empty, _) = lm.loglikelihood(
        [request("loglikelihood", "The river was high", " after the rain"), request("loglikelihood", "", "Water")],
        disable_tqdm=True,
    )
    context, continuation = lm.tok_encode("The river was high"), lm.tok_encode(" after the rain")
    whole = context + continuation
    expected = direct_logprobs(lm.model, whole)[-len(continuation) :]
    assert logprob == pytest.approx(float(expected.sum()), abs=1e-4) and isinstance(greedy, bool)
    water = lm.tok_encode("Water")
    assert empty == pytest.approx(float(direct_logprobs(lm.model, [lm.prefix_token_id, *water]).sum()), abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_in_windows_of_max_length(lm):
    from linspec.data.corpus import SAMPLE

    text = SAMPLE[:600]
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    ids = [lm.prefix_token_id, *lm.tok_encode(text)]
    assert len(ids) > 2 * lm.max_length  # several windows
    expected, scored = 0.0, 1
    while scored < len(ids):  # each window: up to max_length tokens, scoring the ones not scored yet
        end = min(scored + lm.max_length - 1, len(ids))
        window = ids[max(0, end - lm.max_length) : end]
        expected += float(direct_logprobs(lm.model, window)[-(end - scored) :].sum())
        scored = end
    assert total == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_greedy_and_stops_at_the_marker(lm):
    from linspec.evaluation.greedy import greedy_generate

    prompt = "The committee met on Tuesday"
    (free,) = lm.generate_until([request("generate_until", prompt, {"max_gen_toks": 12})], disable_tqdm=True)
    expected = greedy_generate(lm.model, lm.tok_encode(prompt), 12)
    assert free == lm.tok_decode(expected)
    marker = free.strip()[:3]
    (cut,) = lm.generate_until([request("generate_until", prompt, {"until": [marker], "max_gen_toks": 12})], True)
    assert marker not in cut and free.startswith(cut)
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([request("generate_until", prompt, {"do_sample": True, "temperature": 0.7})], True)


def test_eval_harness_runs_a_local_task(tiny_dir, task_dir, tmp_path, capsys):
    code = main(
        ["eval", "harness", str(tiny_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir),
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    assert "| tiny_mc | acc |" in capsys.readouterr().out
    results = json.loads((tmp_path / "harness.json").read_text())["results"]["tiny_mc"]
    assert 0 <= results["acc,none"] <= 1 and results["sample_len"] == len(ROWS)
    assert main(["eval", "harness", str(tiny_dir), "--tasks", "nope", "--include-path", str(task_dir)]) == 2
    assert "unknown harness task(s) nope" in capsys.readouterr().err


def run_harness(command: list[str], task_dir, tmp_path) -> float:
    """Run a harness command line on the local task; the accuracy its results table shows."""
    command = [*command, "--tasks", "tiny_mc", "--include_path", str(task_dir), "--output_path", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tiny_mc" in result.stdout and "acc" in result.stdout
    accuracy = float(next(line for line in result.stdout.splitlines() if "tiny_mc" in line).split("|")[7])
    assert 0 <= accuracy <= 1
    return accuracy


@pytest.mark.parametrize("module", ["linspec.evaluation.harness", "linspec.evaluation.harness_command"])
def test_the_harness_cli_knows_model_linspec(module, tiny_dir, task_dir, tmp_path):
    """``python -m linspec.evaluation.harness`` and what the ``linspec-lm-eval`` command runs."""
    run_harness([sys.executable, "-m", module, "run", "--model", "linspec", "--model_args", f"pretrained={tiny_dir}"],
                task_dir, tmp_path)  # fmt: skip


def test_linspec_lm_eval_is_an_installed_command_running_the_harness_cli():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["linspec-lm-eval"] == "linspec.evaluation.harness_command:main"


def test_plain_lm_eval_runs_a_linspec_directory_through_its_remote_code(tiny_dir, task_dir, tmp_path):
    """The harness's own command, which never imports linspec: ``--model hf`` with ``trust_remote_code=True``."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    arguments = f"pretrained={tiny_dir},trust_remote_code=True,dtype=float32"
    accuracy = run_harness([str(lm_eval), "run", "--model", "hf", "--model_args", arguments], task_dir, tmp_path)
    assert not math.isnan(accuracy)
