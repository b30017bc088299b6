"""A saved linspec model loads the way Hugging Face models load, in processes that never import linspec.

Every check that matters runs in a fresh interpreter (``fresh``) whose script never writes ``import linspec`` and
asserts linspec is not imported before ``from_pretrained``: the directory's ``auto_map`` and remote-code shims
bring it in. Covered: the three save paths (``save_pretrained`` from Python for each architecture, ``linspec
convert``, ``linspec train``), logits against the in-process model, ``pipeline`` against ``generate``, a peft LoRA
forward/backward, the errors without ``trust_remote_code`` or without linspec installed, the model card
``save_pretrained`` writes, and ``push_to_hub`` against a local stand-in of the Hub's upload endpoints.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_linspec

import linspec
from linspec.cli import main
from linspec.models.remote_code import FILES
from linspec.train.tiny import make_tiny_base

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
IDS = [[5, 17, 3, 42, 8, 19, 77, 2, 31, 64, 11, 9, 50, 23, 6, 88, 14, 27, 3, 40]]  # > 2 groups of 8
PROMPT = "The river was high after the spring"

# Run first in every fresh interpreter: linspec must arrive through the model directory, not the script.
PRELUDE = """
import json, sys
def assert_linspec_not_imported():
    early = sorted(name for name in sys.modules if name == "linspec" or name.startswith("linspec."))
    assert not early, f"linspec imported before from_pretrained: {early}"
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Small forwards on a shared 2-core machine: one thread each."""


def fresh(script: str, *args: str, cwd: Path, python: str = sys.executable, env: dict | None = None):
    """Run ``script`` in a new interpreter (stdin closed, one thread, offline); the completed process."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("PYTHONPATH", None)
    return subprocess.run(
        [python, "-c", PRELUDE + script, *args],
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_json(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, the in-process model it was saved from): each architecture saved with
    ``save_pretrained`` from Python, and a ``linspec convert`` output of a tiny Llama with a real tokenizer."""
    root = tmp_path_factory.mktemp("saved")
    models = {}
    for arch in ARCHS:
        model = tiny_linspec(arch)
        model.save_pretrained(root / arch)
        models[arch] = (root / arch, model)
    base = make_tiny_base(root / "base", num_layers=2)
    assert main(["convert", str(base), str(root / "converted"), "--group-size", "8", "--conv-taps", "4"]) == 0
    models["converted"] = (root / "converted", linspec.load(root / "converted", device="cpu", dtype="float32")[0])
    return models


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The model directory a (two-step) ``linspec train`` run writes."""
    from linspec.train.recipe import load_recipe
    from linspec.train.run import train

    root = tmp_path_factory.mktemp("trained")
    base = make_tiny_base(root / "base", num_layers=2)
    recipe = {
        "base": str(base),
        "output": str(root / "run"),
        "conversion": {"group_size": 8, "conv_taps": 4},
        "data": {"train": ["builtin:sample"], "eval": None, "eval_fraction": 0.25, "seq_len": 32},
        "eval": {"baselines": False},
        "stages": [{"kind": "attention_transfer", "steps": 2, "batch_size": 2, "optimizer": {"lr": 0.05}}],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LINSPEC_CACHE", str(root / "cache"))
        return train(load_recipe(root / "recipe.yaml"))


def test_every_save_path_writes_auto_map_and_the_remote_code(saved, trained):
    for directory in [path for path, _ in saved.values()] + [trained, trained.parent / "stages" / "attention_transfer"]:
        config = json.loads((directory / "config.json").read_text())
        name = config["architectures"][0]
        assert config["auto_map"] == {
            "AutoConfig": f"configuration_linspec.{name.replace('ForCausalLM', 'Config')}",
            "AutoModelForCausalLM": f"modeling_linspec.{name}",
        }, directory
        for filename in FILES:
            text = (directory / filename).read_text()
            assert "from linspec.models.modeling import (" in text and name.split("For")[0] in text
    assert not list(trained.parent.glob("**/modeling.py"))  # no copy of linspec's own module


def test_every_architecture_and_save_path_loads_with_remote_code_and_gives_the_same_logits(saved, trained, tmp_path):
    directories = {name: str(path) for name, (path, _) in saved.items()} | {"trained": str(trained)}
    script = """
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
directories, out, ids = json.loads(sys.argv[1]), sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
assert_linspec_not_imported()
logits, classes = {}, {}
for name, directory in directories.items():
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        logits[name] = model(ids).logits.contiguous()
    classes[name] = [type(config).__name__, type(model).__name__, type(model).__module__]
save_file(logits, out)
print(json.dumps(classes))
"""
    out = tmp_path / "logits.safetensors"
    classes = last_json(fresh(script, json.dumps(directories), str(out), json.dumps(IDS), cwd=tmp_path))
    logits = load_file(out)
    expected_models = {name: model for name, (_, model) in saved.items()}
    expected_models["trained"] = linspec.load(trained, device="cpu", dtype="float32")[0]
    for name, model in expected_models.items():
        config_name, model_name, module = classes[name]
        assert (config_name, model_name) == (type(model.config).__name__, type(model).__name__)
        assert module == "linspec.models.modeling"  # the installed package's class, through the shim
        with torch.no_grad():
            expected = model(torch.tensor(IDS)).logits
        torch.testing.assert_close(logits[name], expected, rtol=1e-5, atol=1e-5)


def test_pipeline_generates_the_greedy_tokens_of_linspec_generate(saved, tmp_path):
    directory, model = saved["converted"]
    script = """
from transformers import pipeline
assert_linspec_not_imported()
generator = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
(out,) = generator(sys.argv[2], max_new_tokens=12, do_sample=False, return_tensors=True)
print(json.dumps({"ids": [int(t) for t in out["generated_token_ids"]], "class": type(generator.model).__name__}))
"""
    result = last_json(fresh(script, str(directory), PROMPT, cwd=tmp_path))
    _, tokenizer = linspec.load(directory, device="cpu", dtype="float32")
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0].tolist()
    assert result["class"] == "LinspecLlamaForCausalLM"
    assert len(expected) > prompt["input_ids"].shape[1]  # it generated something
    assert result["ids"] == expected


def test_peft_lora_wraps_the_remote_code_model_and_trains(saved, tmp_path):
    directory, _ = saved["converted"]
    script = """
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
assert_linspec_not_imported()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
model = get_peft_model(model, config)
ids = torch.tensor(json.loads(sys.argv[2]))
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
named = dict(model.named_parameters())
print(json.dumps({
    "loss": float(loss),
    "lora_b_with_grad": sum(1 for n, p in named.items() if "lora_B" in n and p.grad is not None and p.grad.any()),
    "lora_b": sum(1 for n in named if "lora_B" in n),
    "frozen_with_grad": sum(1 for n, p in named.items() if "lora_" not in n and p.grad is not None),
    "attention": type(model.base_model.model.model.layers[0].self_attn).__name__,
}))
"""
    result = last_json(fresh(script, str(directory), json.dumps(IDS), cwd=tmp_path))
    assert result["attention"] == "LinspecAttention"
    assert result["lora_b"] == 2 * 2  # q_proj and v_proj in both layers
    assert result["lora_b_with_grad"] == result["lora_b"] and result["frozen_with_grad"] == 0
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_without_trust_remote_code_transformers_refuses_with_a_clear_error(saved, tmp_path):
    directory, _ = saved["llama"]
    script = """
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as error:
    print()  # after transformers' prompt, which has no newline
    print(json.dumps({"error": str(error), "linspec_imported": "linspec" in sys.modules}))
"""
    result = last_json(fresh(script, str(directory), cwd=tmp_path))
    assert "contains custom code" in result["error"] and "trust_remote_code=True" in result["error"]
    assert not result["linspec_imported"]  # nothing from the directory ran


def test_without_linspec_installed_transformers_says_to_install_it(saved, tmp_path):
    """A venv that borrows this one's packages (torch, transformers) but not linspec's editable install."""
    directory, _ = saved["llama"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = """
import importlib.util
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("linspec") is None
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
except ImportError as error:
    print(json.dumps({"error": str(error)}))
"""
    result = last_json(fresh(script, str(directory), cwd=tmp_path, python=str(venv / "bin" / "python")))
    assert "linspec" in result["error"] and "pip install linspec" in result["error"]


def test_save_pretrained_writes_a_card_and_keeps_one_already_there(saved, tmp_path):
    directory, model = saved["qwen2"]
    card = (directory / "README.md").read_text()
    assert "# linspec model from" in card and "trust_remote_code=True" in card
    assert f"| group size | {model.config.linspec['group_size']} |" in card
    assert "changed after conversion" in card  # tiny_linspec gave γ and conv non-zero values
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my own card\n")
    model.save_pretrained(mine)
    assert (mine / "README.md").read_text() == "my own card\n"
    assert (mine / "model.safetensors").is_file() and not list(mine.glob(".README.md.*"))


def test_convert_and_train_keep_their_own_cards(saved, trained):
    converted = (saved["converted"][0] / "README.md").read_text()
    assert "linspec convert" in converted and "this save does not record" not in converted
    assert "attention_transfer" in (trained / "README.md").read_text()
    stage = trained.parent / "stages" / "attention_transfer"  # a checkpoint: the generic card, its real path
    assert f"linspec.load({json.dumps(str(stage))})" in (stage / "README.md").read_text()


class StandInHub(BaseHTTPRequestHandler):
    """The Hub endpoints ``push_to_hub`` uses — create a repo, ask whether a file exists, validate a card's
    metadata, the preupload check and the commit — keeping every repository's files in ``self.server.repos`` and
    every commit's file list in ``self.server.commits``. Every file is answered "regular" (sent inline in the
    commit), so no LFS server is needed."""

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: dict | None = None, error_code: str | None = None) -> None:
        data = json.dumps(body or {}).encode()
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)  # how the Hub tells a missing file from a missing repo
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_HEAD(self) -> None:  # /{namespace}/{name}/resolve/{revision}/{path}
        parts = self.path.split("?")[0].strip("/").split("/")
        repo, path = "/".join(parts[:2]), "/".join(parts[4:])
        if path in self.server.repos.get(repo, {}):
            return self.reply(200)
        self.reply(404, error_code="EntryNotFound" if repo in self.server.repos else "RepoNotFound")

    def do_GET(self) -> None:  # nothing is downloaded from the stand-in (huggingface_hub asks for optional lists)
        self.reply(404)

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        host = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            request = json.loads(self.body())
            repo = f"{request['organization']}/{request['name']}"
            self.server.repos.setdefault(repo, {})
            return self.reply(200, {"url": f"{host}/{repo}"})
        if path == "/api/validate-yaml":  # the card's metadata block, checked before a commit that carries it
            content = json.loads(self.body())["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except (IndexError, yaml.YAMLError) as error:
                return self.reply(400, {"errors": [{"message": str(error)}]})
            return self.reply(200, {"errors": [], "warnings": []})
        parts = path.strip("/").split("/")  # api/models/{namespace}/{name}/{preupload|commit}/{revision}
        repo, action = "/".join(parts[2:4]), parts[4]
        if action == "preupload":
            files = json.loads(self.body())["files"]
            return self.reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
        assert all(line["key"] == "file" for line in lines[1:])
        self.server.repos[repo].update(files)
        self.server.commits.append(sorted(files))
        self.reply(200, {"commitUrl": f"{host}/{repo}/commit/{len(self.server.commits):040x}",
                         "commitOid": f"{len(self.server.commits):040x}"})  # fmt: skip


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    server.repos, server.commits = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_push_to_hub_uploads_weights_remote_code_and_the_card(saved, hub, tmp_path):
    directory, _ = saved["converted"]
    script = """
import linspec
model, tokenizer = linspec.load(sys.argv[1], device="cpu", dtype="float32")
model.push_to_hub("tester/tiny-linspec", token="hf_stand_in")
# transformers' other path: save into a directory and push what the save wrote; the repo's card stays
model.save_pretrained(sys.argv[2], push_to_hub=True, repo_id="tester/tiny-linspec", token="hf_stand_in")
print(json.dumps({"ok": True}))
"""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}", "HF_TOKEN": "hf_stand_in"}
    last_json(fresh(script, str(directory), str(tmp_path / "again"), cwd=tmp_path, env=env))
    first, second = hub.commits
    expected = {"README.md", "config.json", "generation_config.json", "model.safetensors", *FILES}
    assert set(first) == expected
    assert set(second) == expected - {"README.md"}  # the repository already had a card
    files = hub.repos["tester/tiny-linspec"]
    card = files["README.md"].decode()
    assert 'from_pretrained("tester/tiny-linspec", trust_remote_code=True)' in card  # addressed to the repo
    assert (
        json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"]
        == "modeling_linspec.LinspecLlamaForCausalLM"
    )
    # what the stand-in received is a model: load it, as a user would after downloading, without linspec imported
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in files.items():
        (pulled / name).write_bytes(data)
    script = """
from transformers import AutoModelForCausalLM
assert_linspec_not_imported()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"class": type(model).__name__}))
"""
    assert last_json(fresh(script, str(pulled), cwd=tmp_path))["class"] == "LinspecLlamaForCausalLM"
