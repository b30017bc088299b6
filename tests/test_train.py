"""Training on a tiny random Llama: data, attention transfer, LoRA/distill, checkpoints, exact resume, NaN stop."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

import linspec
from linspec.data.documents import build_splits, global_batch, load_documents, pack
from linspec.errors import LinspecError
from linspec.train.recipe import load_recipe
from linspec.train.run import TrainingDiverged, TrainingInterrupted, lr_factor, train
from linspec.train.state import load_checkpoint
from linspec.train.tiny import make_tiny_base, tiny_tokenizer
from linspec.train.transfer import AttentionTransfer


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(autouse=True)
def linspec_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LINSPEC_CACHE", str(tmp_path / "cache"))


def recipe_file(tmp_path, tiny_base, **changes):
    data = {
        "base": str(tiny_base),
        "output": str(tmp_path / "run"),
        "conversion": {"preset": "paper", "group_size": 8, "conv_taps": 4},
        "data": {"train": ["builtin:sample"], "eval": None, "eval_fraction": 0.25, "seq_len": 32},
        "checkpoint": {"every": 2, "keep": 2},
        "stages": [
            {"kind": "attention_transfer", "steps": 4, "batch_size": 2, "optimizer": {"lr": 0.05}},
            {
                "kind": "lora",
                "steps": 4,
                "batch_size": 2,
                "loss": "distill",
                "trainable": ["gamma", "conv", "norms"],
                "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: resume must restore the RNG too
                "optimizer": {"lr": 0.01},
            },
        ],
    }
    data.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def steps_of(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in records if r["event"] == "step"]


def test_packing_gives_full_sequences_with_eos_between_documents(tmp_path):
    tokenizer = tiny_tokenizer()
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"body": t}) for t in ["one two three", "four five", "six"]) + "\n")
    documents = load_documents(str(source), text_field="body")
    expected = []
    for text in ["one two three", "four five", "six"]:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    packed = pack(documents, tokenizer, seq_len=4)
    assert packed.shape == (len(expected) // 4, 4)
    assert packed.flatten().tolist() == expected[: packed.numel()]
    with pytest.raises(LinspecError, match="not enough text"):
        pack(documents, tokenizer, seq_len=10_000)


def test_held_out_split_never_overlaps_training_and_batches_are_a_function_of_the_step(tmp_path, tiny_base):
    recipe = load_recipe(recipe_file(tmp_path, tiny_base))
    train_seqs, eval_seqs = build_splits(recipe.data, tiny_tokenizer())
    train_rows = {tuple(r) for r in train_seqs.tolist()}
    assert not any(tuple(r) in train_rows for r in eval_seqs.tolist())
    n = len(train_seqs)
    epoch = torch.cat([global_batch(train_seqs, s, 1, seed=0) for s in range(n)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, train_seqs.tolist()))  # each once per epoch
    assert torch.equal(global_batch(train_seqs, 5, 3, 0), global_batch(train_seqs, 5, 3, 0))


def test_schedule_warms_up_then_follows_its_shape(tmp_path, tiny_base):
    stage = load_recipe(recipe_file(tmp_path, tiny_base)).stages[0]
    stage.steps, stage.schedule.warmup_steps, stage.schedule.min_lr_ratio = 10, 2, 0.1
    stage.schedule.name = "cosine"
    assert [lr_factor(s, stage) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, stage) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi))))
    stage.schedule.name = "constant"
    assert lr_factor(9, stage) == 1.0


def test_attention_transfer_targets_are_the_softmax_parents_outputs(tiny_base):
    """With the hooks active, the converted model's hidden states equal the original model's, layer by layer."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = original(ids, output_hidden_states=True).hidden_states
    converted = linspec.convert(
        AutoModelForCausalLM.from_pretrained(tiny_base).eval(), linspec.LinspecConfig(group_size=8, conv_taps=4)
    )
    with torch.no_grad():
        plain = converted(ids, output_hidden_states=True).hidden_states
        with AttentionTransfer(converted) as transfer:
            hooked = converted(ids, output_hidden_states=True).hidden_states
            loss = transfer.loss()
    for got, want in zip(hooked, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[-1], expected[-1], atol=1e-3)  # the linear model itself differs
    assert loss > 0 and transfer.handles == []


def test_two_stage_run_trains_only_what_it_should_and_writes_a_loadable_model(tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM

    path = recipe_file(tmp_path, tiny_base)
    output = train(load_recipe(path))
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    after_transfer = AutoModelForCausalLM.from_pretrained(run / "stages" / "attention_transfer")
    assert type(model).__name__ == "LinspecLlamaForCausalLM"
    assert all(float(m.global_scale.detach()) != 0 for m in after_transfer.linspec_modules())  # γ opened by stage 1
    # stage 1 changed only γ and conv; stage 2 merged LoRA into q/k/v/o and moved the norms, not the MLPs
    base_state, transfer_state, final_state = base.state_dict(), after_transfer.state_dict(), model.state_dict()
    for name, tensor in base_state.items():
        assert torch.equal(tensor, transfer_state[name]), name
    q_name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base_state[q_name], final_state[q_name])
    assert torch.equal(
        base_state["model.layers.0.mlp.up_proj.weight"], final_state["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(base_state["model.norm.weight"], final_state["model.norm.weight"])
    # metrics: every step logged, evaluations for each phase, a PNG, a summary
    assert [(s, n) for s, n, _ in steps_of(run)] == [("attention_transfer", i) for i in range(1, 5)] + [
        ("lora", i) for i in range(1, 5)
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["ppl"]) == {"original", "converted", "attention_transfer", "lora"}
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the recorded table names the exact command, overrides included, and every phase
    from linspec.train.summary import record_benchmark

    record_benchmark(load_recipe(path), "tiny", str(path), overrides=["seed=0"], docs_dir=tmp_path / "docs")
    section = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert f"`linspec train {path} seed=0 --record-bench tiny`" in section
    assert "| after stage lora |" in section and "<!-- bench:tiny:end -->" in section
    # a second run into the same directory must be explicit
    with pytest.raises(LinspecError, match="--resume"):
        train(load_recipe(path))


def test_attention_transfer_lowers_its_loss(tmp_path, tiny_base):
    path = recipe_file(tmp_path, tiny_base, stages=[{"kind": "attention_transfer", "steps": 12, "batch_size": 4,
                                                      "optimizer": {"lr": 0.05}}])  # fmt: skip
    train(load_recipe(path, ["eval.baselines=false"]))
    losses = [loss for _, _, loss in steps_of(tmp_path / "run")]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_transfer_logs_per_layer_losses_and_mid_stage_evaluation_measures_the_linear_model(tmp_path, tiny_base):
    path = recipe_file(tmp_path, tiny_base, stages=[{"kind": "attention_transfer", "steps": 4, "batch_size": 2,
                                                      "optimizer": {"lr": 0.05}}])  # fmt: skip
    train(load_recipe(path, ["eval.every=2"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    for record in steps:  # the logged loss is the mean of the per-layer losses
        assert len(record["layer_losses"]) == 2
        assert sum(record["layer_losses"]) / 2 == pytest.approx(record["loss"], rel=1e-3)
    evals = {(r["stage"], r["step"]): r["ppl"] for r in records if r["event"] == "eval"}
    # with the transfer hooks left on, the model would score exactly like the original (they pass softmax outputs on)
    assert evals[("attention_transfer", 2)] != pytest.approx(evals[("original", 0)], rel=1e-6)
    assert evals[("attention_transfer", 2)] != pytest.approx(evals[("attention_transfer", 4)], rel=1e-6)


def test_ctrl_c_saves_and_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, tiny_base):
    path = recipe_file(tmp_path, tiny_base)
    train(load_recipe(path, ["output=" + str(tmp_path / "straight"), "eval.baselines=false"]))
    straight = steps_of(tmp_path / "straight")

    def interrupt(stage, step, loss):
        if (stage, step) == ("lora", 2):  # seen at the end of step 3, between checkpoints (every 2)
            os.kill(os.getpid(), signal.SIGINT)

    recipe = load_recipe(path, ["output=" + str(tmp_path / "cut"), "eval.baselines=false"])
    with pytest.raises(TrainingInterrupted, match="lora step 3"):
        train(recipe, on_step=interrupt)
    assert (tmp_path / "cut" / "checkpoints" / "lora" / "step-0000003" / "state.safetensors").is_file()
    assert not (tmp_path / "cut" / "model").exists()
    train(recipe, resume=True)
    assert steps_of(tmp_path / "cut") == straight  # same stages, steps and losses, bit for bit


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_base, monkeypatch):
    import linspec.train.stages.attention_transfer as transfer_stage

    recipe = load_recipe(recipe_file(tmp_path, tiny_base), ["eval.baselines=false", "checkpoint.every=1"])
    trained = {}
    real_set_trainable = transfer_stage.set_trainable

    def remember_model(model, *args):
        trained["model"] = real_set_trainable(model, *args)
        return trained["model"]

    def poison(stage, step, loss):  # γ of one layer becomes NaN after step 2: the loss of step 3 is NaN
        if (stage, step) == ("attention_transfer", 2):
            with torch.no_grad():
                trained["model"].linspec_modules()[0].global_scale.fill_(float("nan"))

    monkeypatch.setattr(transfer_stage, "set_trainable", remember_model)
    diverged = r"attention_transfer: loss nan at step 3.*step-0000002.*run again with --force"
    with pytest.raises(TrainingDiverged, match=diverged):
        train(recipe, on_step=poison)
    folder = tmp_path / "run" / "checkpoints" / "attention_transfer"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000001", "step-0000002"]
    state = load_checkpoint(folder / "step-0000002")
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert not (tmp_path / "run" / "model").exists()


def test_unmerged_lora_is_saved_as_an_adapter_beside_the_model(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = recipe_file(tmp_path, tiny_base)
    output = train(load_recipe(path, ["merge_lora=false", "eval.baselines=false", "stages.1.loss=next_token"]))
    assert (output / "adapter" / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(output), output / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # lora_B starts at zero: non-zero values prove the trained adapter weights were saved, not just its config
    assert any(t.abs().sum() > 0 for n, t in model.named_parameters() if "lora_B" in n)


CURRICULUM = [{"seq_len": 16, "steps": 2}, {"seq_len": 48, "steps": 2}]


def test_a_curriculum_changes_the_sequence_length_at_its_phase_boundaries(tmp_path, tiny_base):
    stages = [
        {"kind": "attention_transfer", "steps": 4, "batch_size": 2, "curriculum": CURRICULUM},
        {"kind": "lora", "steps": 3, "batch_size": 2, "lora": {"r": 4}, "loss": "distill",
         "curriculum": [{"seq_len": 64, "steps": 1}, {"seq_len": 24, "steps": 2, "gradient_checkpointing": True}]},
    ]  # fmt: skip
    path = recipe_file(tmp_path, tiny_base, stages=stages)
    seen = []
    train(load_recipe(path, ["eval.baselines=false"]), on_step=lambda stage, step, loss: seen.append((stage, step)))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lengths = [(r["stage"], r["step"], r["seq_len"]) for r in records if r["event"] == "step"]
    assert lengths == [
        ("attention_transfer", 1, 16), ("attention_transfer", 2, 16), ("attention_transfer", 3, 48),
        ("attention_transfer", 4, 48), ("lora", 1, 64), ("lora", 2, 24), ("lora", 3, 24),
    ]  # fmt: skip
    # held-out sequences keep data.seq_len whatever the curriculum
    evals = [r for r in records if r["event"] == "eval"]
    assert all(r["tokens"] % 31 == 0 for r in evals)


def test_curriculum_steps_must_add_up_to_the_stage(tmp_path, tiny_base):
    stages = [{"kind": "attention_transfer", "steps": 5, "curriculum": CURRICULUM}]
    with pytest.raises(LinspecError, match=r"stages\[0\].curriculum: its phases add up to 4 steps"):
        load_recipe(recipe_file(tmp_path, tiny_base, stages=stages))


def test_gradient_checkpointing_changes_memory_not_the_losses(tmp_path, tiny_base):
    stage = {"kind": "lora", "steps": 2, "batch_size": 2, "lora": {"r": 4}, "optimizer": {"lr": 0.01}}
    runs = {}
    for flag in (False, True):
        phases = [{"seq_len": 32, "steps": 2, "gradient_checkpointing": flag}]
        path = recipe_file(tmp_path, tiny_base, stages=[{**stage, "curriculum": phases}])
        train(load_recipe(path, [f"output={tmp_path / str(flag)}", "eval.baselines=false"]))
        runs[flag] = [loss for _, _, loss in steps_of(tmp_path / str(flag))]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_resume_across_a_curriculum_boundary_repeats_the_losses_exactly(tmp_path, tiny_base):
    stages = [{"kind": "lora", "steps": 4, "batch_size": 2, "lora": {"r": 4, "dropout": 0.1}, "loss": "distill",
               "optimizer": {"lr": 0.01}, "curriculum": CURRICULUM}]  # fmt: skip
    path = recipe_file(tmp_path, tiny_base, stages=stages)
    train(load_recipe(path, ["output=" + str(tmp_path / "straight"), "eval.baselines=false"]))

    def interrupt(stage, step, loss):
        if step == 1:  # seen at the end of step 2, the last of the 16-token phase
            os.kill(os.getpid(), signal.SIGINT)

    recipe = load_recipe(path, ["output=" + str(tmp_path / "cut"), "eval.baselines=false"])
    with pytest.raises(TrainingInterrupted, match="lora step 2"):
        train(recipe, on_step=interrupt)
    train(recipe, resume=True)
    assert steps_of(tmp_path / "cut") == steps_of(tmp_path / "straight")


def test_chat_data_is_the_original_models_answers_cached_and_mixed_at_its_ratio(tmp_path, tiny_base, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linspec.data import chat as chat_data
    from linspec.data.documents import TrainingSet
    from linspec.data.settings import Chat, Data

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base)
    chat = Chat(prompts="builtin:sample", num_prompts=3, max_new_tokens=5, batch_size=2, ratio=0.25)
    first = chat_data.conversations(chat, "tiny", model, tokenizer, progress=False)
    prompts = chat_data.instruction_prompts("builtin:sample", 3, seed=0)
    assert prompts == chat_data.instruction_prompts("builtin:sample", 3, seed=0)  # reproducible
    for prompt, text in zip(prompts, first, strict=True):  # the template renders the user turn, then an answer
        assert text.startswith(f"user: {prompt}<|endoftext|>assistant: ")
    # the answers are greedy generations of the original model, batched with left padding
    alone = chat_data.generate_answers(model, tokenizer, prompts[2:], chat, progress=False)
    assert first[2].endswith(f"assistant: {alone[0]}<|endoftext|>")

    def refuse(*args, **kwargs):
        raise AssertionError("the cached answers should have been reused")

    monkeypatch.setattr(chat_data, "generate_answers", refuse)
    assert chat_data.conversations(chat, "tiny", model, tokenizer, progress=False) == first
    cached = chat_data.cache_file("tiny", prompts, chat)
    assert cached.is_file() and len(cached.read_text().splitlines()) == 3
    with pytest.raises(AssertionError, match="reused"):  # other settings: another cache entry
        chat_data.conversations(Chat(**{**vars(chat), "max_new_tokens": 6}), "tiny", model, tokenizer)

    import datasets

    documents = datasets.Dataset.from_dict({"text": ["one two three four five six seven eight nine ten"] * 40})
    data = Data(seq_len=8, chat=chat)
    mixed = TrainingSet(documents, tokenizer, data, datasets.Dataset.from_dict({"text": first}))
    text, chat_sequences = mixed.prepare(8)
    rows = torch.cat([mixed.batch(step, 4, 8) for step in range(6)])
    is_chat = [any(torch.equal(row, c) for c in chat_sequences) for row in rows]
    assert is_chat == [False, False, False, True] * 6  # exactly a quarter, spread evenly
    assert torch.equal(mixed.batch(3, 4, 8), rows[12:16])  # a pure function of the step


def test_recall_data_changes_what_is_trained_on_and_resumes_exactly(tmp_path, tiny_base):
    stages = [{"kind": "lora", "steps": 3, "batch_size": 2, "lora": {"r": 4}, "loss": "distill",
               "optimizer": {"lr": 0.01}, "curriculum": [{"seq_len": 512, "steps": 3}]}]  # fmt: skip
    path = recipe_file(tmp_path, tiny_base, stages=stages)  # 512 tokens: room for 4 facts with the tiny tokenizer
    runs = {}
    for name, overrides in {"plain": [], "recall": ["data.recall.ratio=0.5"]}.items():
        train(load_recipe(path, [f"output={tmp_path / name}", "eval.baselines=false", *overrides]))
        runs[name] = steps_of(tmp_path / name)
    assert runs["recall"][0] != runs["plain"][0]  # half the sequences now end by restating facts
    assert "50% recall sequences" in (tmp_path / "recall" / "model" / "README.md").read_text()  # the card says so

    def interrupt(stage, step, loss):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    recipe = load_recipe(path, [f"output={tmp_path / 'cut'}", "eval.baselines=false", "data.recall.ratio=0.5"])
    with pytest.raises(TrainingInterrupted, match="lora step 2"):
        train(recipe, on_step=interrupt)
    train(recipe, resume=True)
    assert steps_of(tmp_path / "cut") == runs["recall"]


LEGACY_RUN = Path(__file__).parent / "golden" / "legacy-run"  # written by the code before the redesign


def test_a_run_interrupted_by_an_earlier_release_resumes_to_the_same_losses_and_weights(tmp_path, monkeypatch, capfd):
    """A run directory outlives code moves: resuming one that the earlier code cut by Ctrl-C gives, step for step,
    the losses and the final tensors of that code's uninterrupted run, within rounding (the fixture's CPU went
    unrecorded and other CPU models round differently: ``tests/arithmetic.py``; resuming today's runs is exact)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(LEGACY_RUN, tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")
    train(load_recipe("recipe.yaml"), resume=True)
    log = capfd.readouterr().out  # resumed, not started over (a fresh start would give the same losses)
    assert "attention_transfer: already finished" in log and "lora: resuming at step 3" in log
    run = tmp_path / "legacy" / "interrupted"
    straight = [json.loads(line) for line in (LEGACY_RUN / "straight-metrics.jsonl").read_text().splitlines()]
    expected_steps = [(r["stage"], r["step"], pytest.approx(r["loss"], rel=1e-3)) for r in straight
                      if r["event"] == "step"]  # fmt: skip
    assert steps_of(run) == expected_steps
    resumed = load_file(str(run / "model" / "model.safetensors"))
    expected = load_file(str(LEGACY_RUN / "straight-model.safetensors"))
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_recipe_stored_before_a_key_existed_matches_that_keys_default_and_no_other_value(tmp_path, monkeypatch):
    """Keys added since a run started (here the far-memory ones) count as unchanged at their defaults: the run
    computed what the default computes. Any other value is another recipe."""
    import dataclasses
    import shutil

    import yaml

    from linspec.train.rundir import check_same_recipe

    shutil.copytree(LEGACY_RUN, tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")
    stored = Path("interrupted/recipe.yaml")
    stage = yaml.safe_load(stored.read_text())["stages"][1]
    assert "output_mse_weight" not in stage and "memory_bias_lr" not in stage["optimizer"]  # written before them
    recipe = load_recipe("recipe.yaml")
    check_same_recipe(stored, recipe)
    lora = recipe.stages[1]
    changed = dataclasses.replace(lora, optimizer=dataclasses.replace(lora.optimizer, memory_bias_lr=0.1))
    with pytest.raises(LinspecError, match=r"differs from the one .* \(stages.1.optimizer.memory_bias_lr\)"):
        check_same_recipe(stored, dataclasses.replace(recipe, stages=[recipe.stages[0], changed]))


def test_far_memory_trains_the_hedgehog_maps_and_memory_bias_only(tmp_path, tiny_base):
    """``trainable: [far_memory]`` opens the maps and b_h; the window's weights and every base weight stay put."""
    from transformers import AutoModelForCausalLM

    conversion = {"preset": "window-hedgehog", "local_window": 8, "sink_tokens": 1}
    stage = {"kind": "attention_transfer", "steps": 3, "batch_size": 2, "trainable": ["far_memory"],
             "optimizer": {"lr": 0.05}}  # fmt: skip
    output = train(load_recipe(recipe_file(tmp_path, tiny_base, conversion=conversion, stages=[stage]),
                               ["eval.baselines=false"]))  # fmt: skip
    trained = AutoModelForCausalLM.from_pretrained(output).state_dict()
    untrained = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    memory = [n for n in trained if "memory_bias" in n or "memory_feature_map" in n]
    assert {n.rsplit(".", 1)[-1] for n in memory} == {"memory_bias", "memory_feature_map_q", "memory_feature_map_k"}
    layers = AutoModelForCausalLM.from_pretrained(output).linspec_modules()
    eye = torch.eye(layers[0].memory_feature_map_q.shape[-1])
    assert not torch.equal(layers[0].memory_feature_map_q.detach()[0], eye)  # moved off the identity init
    assert not torch.equal(layers[0].memory_feature_map_k.detach()[0], eye)
    for name, tensor in untrained.items():
        assert torch.equal(tensor, trained[name]), name
    assert not any(n.endswith(("global_scale", "conv_weight", "decay_logit")) for n in trained)  # no grouped term


def test_without_the_grouped_term_a_stage_opens_the_far_memory_by_default_and_refuses_gamma(tmp_path, tiny_base):
    """A stage that names no ``trainable`` trains what the conversion has (the far memory, not γ and the conv);
    naming γ where there is no grouped term is one line that says so."""
    conversion = {"preset": "window-hedgehog", "local_window": 8, "sink_tokens": 1}
    stage = {"kind": "attention_transfer", "loss": "far_attention", "steps": 1, "batch_size": 2}
    recipe = load_recipe(recipe_file(tmp_path, tiny_base, conversion=conversion, stages=[stage]))
    assert recipe.stages[0].trainable == ["far_memory"]
    path = recipe_file(tmp_path, tiny_base, conversion=conversion, stages=[{**stage, "trainable": ["gamma"]}])
    with pytest.raises(LinspecError, match=r"trainable lists gamma but this conversion has no grouped term"):
        train(load_recipe(path, ["eval.baselines=false"]))


def test_far_memory_without_a_far_memory_is_one_line_naming_the_preset(tmp_path, tiny_base):
    stage = {"kind": "attention_transfer", "steps": 1, "batch_size": 2, "trainable": ["far_memory"]}
    path = recipe_file(tmp_path, tiny_base, stages=[stage])
    with pytest.raises(LinspecError, match=r"trainable lists far_memory but .*window-hedgehog"):
        train(load_recipe(path, ["eval.baselines=false"]))
