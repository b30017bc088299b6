"""Hostile inputs through the public Python API: each row raises one ``LinspecError`` with a one-line message,
runs no code from data and leaves the files it was pointed at as they were."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile_world import evil_pickle
from tiny_models import tiny_base, tiny_linspec

import linspec
from linspec.config import LinspecConfig
from linspec.conversion.checkpoint import load
from linspec.errors import LinspecError
from linspec.sources.loading import load_source, read_config_json
from linspec.train import train
from linspec.train.recipe import apply_override, load_recipe
from linspec.train.state import MetricsLog, load_checkpoint, save_checkpoint
from linspec.utils.io import atomic_directory
from linspec.utils.paths import check_name, child_path


def good_checkpoint(run: Path) -> Path:
    state = {
        "step": 2,
        "trainable": {"w": torch.ones(2)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}]},
        "scheduler": {"last_epoch": 2},
        "rng": [{"torch": torch.get_rng_state()}],
    }
    return save_checkpoint(run, "stage", 2, state, keep=2)


def damage(edit: Callable[[Path], None]) -> Callable[[Path], Path]:
    """A checkpoint saved properly, then edited by ``edit``."""

    def make(run: Path) -> Path:
        path = good_checkpoint(run)
        edit(path)
        return path

    return make


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    return edit


def _truncate(name: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])

    return edit


def _pickled(path: Path) -> None:
    for name in ("state.json", "state.safetensors"):
        (path / name).unlink()
    (path / "state.pt").write_bytes(evil_pickle(path.parent / "pwned-by-pickle"))


CHECKPOINTS = {
    "pickle-state-pt": (damage(_pickled), "never loads"),
    "meta-missing": (damage(lambda p: (p / "meta.json").unlink()), "meta.json is missing"),
    "meta-foreign": (damage(_write("meta.json", '{"format": "torch", "step": 2}')), "meta.json does not say"),
    "meta-binary": (damage(_write("meta.json", b"\xff\x00")), "not valid JSON"),
    "tensors-truncated": (damage(_truncate("state.safetensors")), "state.safetensors"),
    "tensors-missing": (damage(lambda p: (p / "state.safetensors").unlink()), "missing"),
    "skeleton-truncated": (damage(_truncate("state.json")), "not valid JSON"),
    "skeleton-unknown-tag": (damage(_write("state.json", '{"$eval": "__import__(\\"os\\")"}')), "unknown or"),
    "skeleton-unknown-tensor": (
        damage(_write("state.json", '{"step": 2, "trainable": {"w": {"$tensor": "t99"}}}')),
        "does not hold",
    ),
    "skeleton-deep": (damage(_write("state.json", "[" * 100_000 + "]" * 100_000)), "not valid JSON"),
    "skeleton-bad-array": (
        damage(_write("state.json", '{"$ndarray": [1, "x"], "dtype": "uint32"}')),
        "does not fit its dtype",
    ),
    "skeleton-object-dtype": (damage(_write("state.json", '{"$ndarray": [1], "dtype": "object"}')), "malformed"),
    "step-mismatch": (
        damage(
            lambda p: (p / "meta.json").write_text(json.dumps({**json.loads((p / "meta.json").read_text()), "step": 9}))
        ),
        "does not match",
    ),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_damaged_or_crafted_checkpoints_are_one_error_and_run_nothing(name, tmp_path):
    make, fragment = CHECKPOINTS[name]
    path = make(tmp_path / "run")
    with pytest.raises(LinspecError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and fragment in message and str(path) in message
    assert not list(tmp_path.rglob("pwned-by-pickle"))


def test_a_good_checkpoint_round_trips(tmp_path):
    state = load_checkpoint(good_checkpoint(tmp_path))
    assert state["step"] == 2 and torch.equal(state["trainable"]["w"], torch.ones(2))
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(state["rng"][0]["torch"], torch.get_rng_state())


BAD_NAMES = ["", ".", "..", ".hidden", "/abs", "a/b", "a\\b", "../x", "x" * 65, "nul\0", "a b", "tab\t", "é", "-x"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_names_that_become_paths_are_plain(name):
    with pytest.raises(LinspecError, match="stage name"):
        check_name(name, "stage name")


@pytest.mark.parametrize("name", [5, None, ["a"]])
def test_a_name_must_be_a_string(name):
    with pytest.raises(LinspecError, match="expected a name"):
        check_name(name, "stage name")


def test_child_path_refuses_a_symbolic_link_out(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "stages" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(LinspecError, match="leads outside"):
        child_path(tmp_path / "stages", "link", "stage name")
    assert child_path(tmp_path / "stages", "transfer", "stage name") == tmp_path / "stages" / "transfer"


def _with_first_stage(world, **changes):
    """The world's recipe, loaded and checked, then its first stage changed in Python (past ``load_recipe``)."""
    import dataclasses

    recipe = load_recipe(world["recipe.yaml"], [f"output={world.root}/hand-made-run"])
    return dataclasses.replace(recipe, stages=[dataclasses.replace(recipe.stages[0], **changes), *recipe.stages[1:]])


API_CASES: dict[str, tuple[Callable[..., object], str]] = {
    "config-group-zero": (lambda w: LinspecConfig(group_size=0), "group_size must be an integer in 1.."),
    "config-group-bool": (lambda w: LinspecConfig(group_size=True), "group_size must be an integer in 1.."),
    "config-group-text": (lambda w: LinspecConfig(group_size="8"), "group_size must be an integer in 1.."),
    "config-group-absurd": (lambda w: LinspecConfig(group_size=10**9), "group_size must be an integer in 1.."),
    "config-taps-absurd": (lambda w: LinspecConfig(conv_taps=10**8), "conv_taps must be an integer in 1.."),
    "config-layers-negative": (lambda w: LinspecConfig(softmax_layers=(-1,)), "softmax_layers must be"),
    "config-layers-absurd": (lambda w: LinspecConfig(softmax_layers=range(10**7)), "more)"),
    "config-layers-string": (lambda w: LinspecConfig(softmax_layers="01"), "list of layer indices"),
    "config-layers-int": (lambda w: LinspecConfig(softmax_layers=3), "list of layer indices"),
    "config-feature-map": (lambda w: LinspecConfig(feature_map="softmax"), "feature_map must be one of"),
    "config-preset": (lambda w: LinspecConfig.from_preset("fast"), "unknown preset"),
    "config-from-dict": (lambda w: LinspecConfig.from_dict({"group": 8}), "unknown linspec setting"),
    "convert-twice": (lambda w: linspec.convert(tiny_linspec()), "already a linspec model"),
    "convert-layer-range": (
        lambda w: linspec.convert(tiny_base("llama"), LinspecConfig(softmax_layers=(3,))),
        "out of range",
    ),
    "convert-group-past-positions": (
        lambda w: linspec.convert(tiny_base("llama"), LinspecConfig(group_size=512)),
        "larger than the model's 256 positions",
    ),
    "load-missing": (lambda w: load(w["missing"]), "no such file or directory"),
    "load-config-list": (lambda w: load(w["config-list"]), "holds a JSON list"),
    "load-pickle": (lambda w: load(w["pickle-evil"]), "allow_pickle=True"),
    "recipe-overrides-string": (lambda w: load_recipe(w["recipe.yaml"], "seed=1"), "a list of 'key=value' strings"),
    "recipe-overrides-number": (lambda w: load_recipe(w["recipe.yaml"], [1]), "a list of 'key=value' strings"),
    "load-pickle-allowed": (
        lambda w: load_source(w["pickle-evil"], allow_pickle=True, progress=False),
        "holds objects other than tensors",
    ),
    "load-local-typo": (lambda w: load_source("base/typo"), "no such file"),
    "read-config-binary": (lambda w: read_config_json(Path(w["config-binary"]) / "config.json"), "not valid JSON"),
    "recipe-scalar": (lambda w: load_recipe(w["recipe-scalar.yaml"]), "a recipe is a mapping"),
    "train-not-a-recipe": (lambda w: train(None), "train(recipe): a Recipe"),
    "train-recipe-path": (lambda w: train(w["recipe.yaml"]), "train(recipe): a Recipe"),
    "train-hand-made-negative-steps": (lambda w: train(_with_first_stage(w, steps=-3)), "steps"),
    "recipe-python-tag": (lambda w: load_recipe(w["recipe-python-tag.yaml"]), "not valid YAML"),
    "recipe-override-yaml": (lambda w: apply_override({}, "seed=[1"), "not valid YAML"),
    "recipe-override-empty-part": (lambda w: apply_override({}, "a..b=1"), "empty key"),
    "recipe-stage-name": (
        lambda w: load_recipe(w["recipe.yaml"], [f"stages.0.name={w['victim']}"]),
        "not a plain name",
    ),
    "recipe-grad-clip": (lambda w: load_recipe(w["recipe.yaml"], ["stages.0.optimizer.grad_clip=-1"]), "grad_clip"),
    "atomic-force-non-model": (
        lambda w: atomic_directory(w["victim"], force=True).__enter__(),
        "refusing to replace it even with --force",
    ),
    "atomic-into-file": (lambda w: atomic_directory(w["a-file"], force=True).__enter__(), "not a directory"),
    "ppl-window-one": (
        lambda w: list(
            __import__("linspec.evaluation.perplexity").evaluation.perplexity.scoring_windows(torch.arange(4), 1, 1)
        ),
        "need window >= 2",
    ),
}


LEGACY_DRAFTER = Path(__file__).parent / "golden" / "legacy-drafter"


def _drafter_parts(world):
    from transformers import AutoModelForCausalLM

    from linspec.drafting.store import build

    target = AutoModelForCausalLM.from_pretrained(world["base"])
    module = build("medusa", target, {"depth": 2})
    return target, module, torch.optim.AdamW(module.trainable_parameters())


def _tampered_drafter_checkpoint(world, edit: Callable[[dict], None]):
    """A real checkpoint of an old drafter run (tests/golden/legacy-drafter), copied and then edited (``edit`` gets
    its state.json as a dict), read the way ``--resume`` reads old runs."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    from linspec.drafting.store import build, load_drafter
    from linspec.train.legacy_drafter import load_legacy_checkpoint

    folder = Path(tempfile.mkdtemp(dir=world.root / "scratch")) / "step-0000003"
    shutil.copytree(LEGACY_DRAFTER / "interrupted" / "checkpoints" / "step-0000003", folder)
    meta = json.loads((folder / "state.json").read_text())
    edit(meta)
    (folder / "state.json").write_text(json.dumps(meta))
    target = AutoModelForCausalLM.from_pretrained(LEGACY_DRAFTER / "base")
    finished = load_drafter(LEGACY_DRAFTER / "drafter", target)  # the run's kind, shapes and draft vocabulary
    module = build("medusa", target, {"depth": 2, "draft_vocab": 16}, finished.vocab.token_ids)
    return load_legacy_checkpoint(folder, module, torch.optim.AdamW(module.trainable_parameters()), max_step=6)


def _links_then_remove(world):
    from linspec.utils.io import remove_entries

    run = Path(world["scratch"]) / "linked-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "stages").symlink_to(world["victim"])
    remove_entries(run, ["checkpoints", "stages"])  # refused before removing checkpoints


ROUND_TWO: dict[str, tuple[Callable[..., object], str]] = {
    "from-dict-list": (lambda w: LinspecConfig.from_dict([1, 2]), "must be a mapping"),
    "from-dict-layers-number": (lambda w: LinspecConfig.from_dict({"softmax_layers": 5}), "must be a list"),
    "from-dict-heads-text": (lambda w: LinspecConfig.from_dict({"softmax_heads": "0:1"}), "must be a list"),
    "from-dict-group-text": (lambda w: LinspecConfig.from_dict({"group_size": "8"}), "integer in 1.."),
    "from-dict-feature-map-list": (lambda w: LinspecConfig.from_dict({"feature_map": ["relu"]}), "must be a name"),
    "from-dict-decay-text": (lambda w: LinspecConfig.from_dict({"global_decay": "yes"}), "true or false"),
    "from-dict-window-float": (
        lambda w: LinspecConfig.from_dict({"local_kernel": "softmax", "local_window": 2.5}),
        "local_window must be an integer",
    ),
    "load-fewer-layers": (lambda w: load(w["fewer-layers"], device="cpu"), "has no place for"),
    "load-missing-layer": (lambda w: load(w["missing-layer"], device="cpu"), "lacks model.layers.1"),
    "load-nan-weights": (lambda w: load(w["nan-weights"], device="cpu"), "non-finite"),
    "load-zero-heads": (lambda w: load(w["zero-heads"], device="cpu"), "num_attention_heads must be"),
    "load-linspec-layers-number": (lambda w: load(w["linspec-layers-number"], device="cpu"), "must be a list"),
    "drafter-bad-ids": (
        lambda w: __import__("linspec.drafting").drafting.store.load_drafter(
            w["drafter-ids-out-of-range"], _drafter_parts(w)[0]
        ),
        "draft vocabulary ids must be in",
    ),
    "drafter-build-ids-negative": (
        lambda w: __import__("linspec.drafting").drafting.store.build(
            "medusa", _drafter_parts(w)[0], {"depth": 1, "draft_vocab": 2}, torch.tensor([-1, 0])
        ),
        "draft vocabulary ids must be in",
    ),
    "drafter-checkpoint-step-text": (
        lambda w: _tampered_drafter_checkpoint(w, lambda m: m.update(step="3")),
        "is damaged",
    ),
    "drafter-checkpoint-step-huge": (
        lambda w: _tampered_drafter_checkpoint(w, lambda m: m.update(step=2**70)),
        "is damaged",
    ),
    "drafter-checkpoint-no-adam-steps": (
        lambda w: _tampered_drafter_checkpoint(w, lambda m: m.pop("adam_steps")),
        "is damaged",
    ),
    "drafter-checkpoint-foreign": (
        lambda w: _tampered_drafter_checkpoint(w, lambda m: m.update(format="torch")),
        "not a drafter checkpoint",
    ),
    "remove-entries-through-link": (_links_then_remove, "symbolic link"),
    "passkey-trials-absurd": (
        lambda w: __import__("linspec.evaluation.passkey").evaluation.passkey.make_trials(None, 64, 10**8),
        "trials must be an integer in 1..4096",
    ),
    "passkey-seed-huge": (
        lambda w: __import__("linspec.evaluation.passkey").evaluation.passkey.make_trials(None, 64, 2, seed=2**70),
        "seed must be an integer in 0..4294967295",
    ),
    "curve-windows-absurd": (
        lambda w: __import__("linspec.evaluation.lengths").evaluation.lengths.perplexity_by_length(
            tiny_base("llama"), torch.arange(64), [8], max_windows=10**8
        ),
        "max_windows must be an integer in 1..4096",
    ),
    "curve-length-absurd": (
        lambda w: __import__("linspec.evaluation.lengths").evaluation.lengths.check_lengths(
            torch.nn.Linear(1, 1), [10**9]
        ),
        "lengths must be integers in 2..1048576",
    ),
    "agreement-tokens-absurd": (
        lambda w: __import__("linspec.evaluation.agreement").evaluation.agreement.greedy_answers(None, None, [], 10**8),
        "max_new_tokens must be an integer in 1..16384",
    ),
    "recipe-seed-huge": (lambda w: load_recipe(w["recipe.yaml"], [f"seed={2**70}"]), "recipe key seed must be"),
    "recipe-seq-len-one": (lambda w: load_recipe(w["recipe.yaml"], ["data.seq_len=1"]), "at least 2 tokens"),
    "drafter-recipe-seed-huge": (
        lambda w: load_recipe(w["drafter.yaml"], [f"seed={2**70}"]),
        "recipe key seed must be",
    ),
    "copy-recipe-through-link": (
        lambda w: __import__("linspec.train.catalog").train.catalog.copy_recipe(
            "smollm2-135m-demo", w["scratch"] + "/linked.yaml", force=True
        ),
        "symbolic link",
    ),
    "count-bool": (
        lambda w: __import__("linspec.utils.validation").utils.validation.check_count(True, "n"),
        "n must be",
    ),
    "count-float": (
        lambda w: __import__("linspec.utils.validation").utils.validation.check_count(2.0, "n", 1, 4),
        "in 1..4",
    ),
}
API_CASES.update(ROUND_TWO)


def _speculate(*, target=None, drafter=None, input_ids=((5, 6, 7),), **options):
    from linspec.speculative.drafters import PromptLookupDrafter

    model = tiny_linspec("llama") if target is None else target
    drafter = PromptLookupDrafter(num_tokens=4) if drafter is None else drafter
    return linspec.speculative_generate(model, drafter, input_ids, **{"max_new_tokens": 2, **options})


ROUND_THREE: dict[str, tuple[Callable[..., object], str]] = {  # the third sweep's API rows
    "convert-none": (lambda w: linspec.convert(None), "from_pretrained), got NoneType"),
    "convert-a-path": (lambda w: linspec.convert(w["base"]), "from_pretrained), got str"),
    "convert-preset-name": (lambda w: linspec.convert(tiny_base("llama"), "window"), "config must be a LinspecConfig"),
    "convert-settings-dict": (
        lambda w: linspec.convert(tiny_base("llama"), {"group_size": 8}),
        "config must be a LinspecConfig",
    ),
    "preset-unknown-setting": (
        lambda w: LinspecConfig.from_preset("window", bogus=1),
        "unknown linspec setting(s): bogus",
    ),
    "load-empty-source": (lambda w: load_source(""), "the model source is empty"),
    "speculate-ids-none": (lambda w: _speculate(input_ids=None), "input_ids must be a [batch, length] integer tensor"),
    "speculate-ids-float": (lambda w: _speculate(input_ids=torch.ones(1, 3)), "got torch.float32 of shape (1, 3)"),
    "speculate-target-none": (lambda w: _speculate(target="model"), "target must be a causal language model"),
    "speculate-drafter-name": (lambda w: _speculate(drafter="lookup"), "drafter must be a linspec Drafter"),
    "speculate-eos-text": (lambda w: _speculate(eos_token_id="x"), "eos_token_id must be a token id"),
    "speculate-tree-nodes-zero": (lambda w: _speculate(max_tree_nodes=0), "max_tree_nodes must be an integer in 1.."),
}
API_CASES.update(ROUND_THREE)


@pytest.fixture(scope="module")
def scratch(world):
    """Where API rows build what they then break; ``linked.yaml`` points at the precious file."""
    folder = world.root / "scratch"
    folder.mkdir()
    (folder / "linked.yaml").symlink_to(Path(world["victim"]) / "precious.txt")
    return folder


@pytest.mark.usefixtures("scratch")
@pytest.mark.parametrize("name", list(API_CASES))
def test_api_refuses_bad_input_with_one_line(name, world, monkeypatch):
    monkeypatch.chdir(world.root)
    call, fragment = API_CASES[name]
    with pytest.raises(LinspecError) as error:
        call(world)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400 and fragment in message, message
    assert (Path(world["victim"]) / "precious.txt").read_text() == "keep me"
    assert not world.canary.exists()


def test_a_refused_pickle_is_one_error_without_torchs_protocol_warning(world):
    """The CLI prints warnings on stderr: torch's note on the pickle protocol would precede the one line."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(LinspecError, match="holds objects other than tensors"):
            load_source(world["pickle-evil"], allow_pickle=True, progress=False)
    assert not [w for w in seen if "pickle" in str(w.message)], [str(w.message) for w in seen]
    assert not world.canary.exists()


def test_a_loss_plot_of_zero_losses_is_drawn_without_a_warning(tmp_path):
    """Inside its window a raw conversion is the original, so short sequences give a loss of exactly 0: no log
    axis for them (matplotlib warns and draws nothing), a log axis for positive losses."""
    import warnings

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        log.write(event="step", stage="transfer", step=step, loss=0.0, loss_name="mse")
        log.write(event="step", stage="lora", step=step, loss=1.0 / step, loss_name="kl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_log_skips_a_torn_last_line_and_refuses_damage_elsewhere(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(event="step", stage="a", step=1)
    log.write(event="step", stage="a", step=2)
    with open(log.path, "a") as handle:
        handle.write('{"event": "st')  # killed mid-write
    assert [r["step"] for r in log.records()] == [1, 2]
    log.repair()
    log.write(event="step", stage="a", step=3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.path.write_text('{"step": 1}\n[garbage\n{"step": 3}\n')
    with pytest.raises(LinspecError, match="line 2 is damaged"):
        log.records()
