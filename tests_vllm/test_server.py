"""A real ``linspec serve`` process (vLLM's OpenAI-compatible server, the plugin found through its entry point in
the engine's own process) driven over HTTP: greedy completions and chat equal ``linspec generate``, streamed or
not, for concurrent clients; a client that hangs up mid-stream; bad requests answered 4xx while serving on."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

MAX_MODEL_LEN = 2048
NEW_TOKENS = 16
WINDOW = 512
# Prompt lengths in tokens: short ones, around the 512-token window and past it.
LENGTHS = (3, 40, 150, 350, 520, 700, 1000, 1400)
QUESTIONS = ("What is the capital of France?", "Write one sentence about the sea.")
JSON = {"Content-Type": "application/json"}  # vLLM answers 400 to a body of any other type
STARTUP_SECONDS = 600  # two shared CPU cores: vLLM's start (engine process, warm-up) takes one to several minutes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """The server process and how to reach it."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def connection(self, timeout: float = 300) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
        connection = self.connection()
        try:
            data = None if body is None else json.dumps(body)
            connection.request(method, path, body=data, headers=JSON)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def post(self, path: str, body: dict) -> dict:
        status, text = self.request("POST", path, body)
        assert status == 200, f"{path} answered {status}: {text[:300]}"
        return json.loads(text)

    def stream(self, path: str, body: dict) -> str:
        """The text of a streamed answer: its server-sent events' pieces, concatenated in order."""
        connection = self.connection()
        try:
            connection.request("POST", path, body=json.dumps({**body, "stream": True}), headers=JSON)
            response = connection.getresponse()
            assert response.status == 200, response.read()[:300]
            pieces, done = [], False
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                choice = json.loads(line[len("data: ") :])["choices"][0]
                pieces.append(choice["text"] if "text" in choice else choice["delta"].get("content") or "")
            assert done, "the stream ended without [DONE]"
            return "".join(pieces)
        finally:
            connection.close()

    def running_requests(self) -> float:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        values = [
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:num_requests_running")
        ]
        assert values, "the server's /metrics has no vllm:num_requests_running"
        return sum(values)


@pytest.fixture(scope="module")
def server(window_model, tmp_path_factory, request):
    """``linspec serve`` on the window model, on a free port, in its own process group (stopped at the end)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine in its own process: the plugin by entry point only
    command = [sys.executable, "-m", "linspec", "serve", str(window_model), "--port", str(port), "--name", "window",
               "--max-concurrency", "16", "--", "--max-model-len", str(MAX_MODEL_LEN)]  # fmt: skip
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(process, port, log)
    failed_before = request.session.testsfailed
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"linspec serve exited with {process.returncode} before serving:\n{server.tail()}")
            with contextlib.suppress(OSError):
                if server.request("GET", "/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"linspec serve did not answer /health within {STARTUP_SECONDS} s:\n{server.tail()}")
            time.sleep(2)
        yield server
    finally:
        process.terminate()  # the server stops its engine processes itself
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # whatever of its process group outlived it
            os.killpg(process.pid, signal.SIGKILL)
        if request.session.testsfailed > failed_before:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            reporter.write_line(f"\n--- linspec serve log (last lines of {log}) ---\n{server.tail()}")


def documentation_prompts(model: Path) -> list[str]:
    """Real text (linspec's documentation) of about ``LENGTHS`` tokens each, from different places, cut where the
    model's tokenizer puts a token boundary."""
    from transformers import AutoTokenizer

    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "\n\n".join(path.read_text() for path in sorted(docs.glob("*.md")))
    offsets = AutoTokenizer.from_pretrained(model)(text, return_offsets_mapping=True)["offset_mapping"]
    starts = [1000 * i for i in range(len(LENGTHS))]
    assert len(offsets) > starts[-1] + max(LENGTHS), "not enough documentation text for the prompts"
    return [text[offsets[s][0] : offsets[s + n][0]] for s, n in zip(starts, LENGTHS, strict=True)]


def linspec_generate(model: Path, prompts: list[str], *, chat: bool) -> list[str]:
    """``linspec generate``'s greedy texts (linspec's own model class and cache), the prompts as one batch."""
    command = [sys.executable, "-m", "linspec", "generate", str(model), "--json", "--dtype", "float32",
               "--max-new-tokens", str(NEW_TOKENS)]  # fmt: skip
    for prompt in prompts:
        command += ["--prompt", prompt]
    done = subprocess.run([*command] if chat else [*command, "--no-chat"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["texts"]


@pytest.fixture(scope="module")
def completions(window_model) -> tuple[list[str], list[str]]:
    prompts = documentation_prompts(window_model)
    return prompts, linspec_generate(window_model, prompts, chat=False)


@pytest.fixture(scope="module")
def chats(window_model) -> tuple[list[str], list[str]]:
    return list(QUESTIONS), linspec_generate(window_model, list(QUESTIONS), chat=True)


def completion_body(prompt: str, **extra) -> dict:
    return {"model": "window", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, **extra}


def chat_body(question: str, **extra) -> dict:
    messages = [{"role": "user", "content": question}]
    return {"model": "window", "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0, **extra}


def same_text(served: str, generated: str) -> bool:
    """``linspec generate`` prints its text trimmed (the space a completion starts with is not shown)."""
    return served.strip() == generated.strip()


def test_the_plugin_is_installed_as_a_vllm_entry_point_and_registers_idempotently():
    from vllm import ModelRegistry

    from linspec.serving.registration import architectures, register

    plugins = {entry.name: entry.value for entry in metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("linspec") == "linspec.serving.registration:register"
    register()
    first = {name: ModelRegistry.models[name] for name in architectures()}
    register()
    assert {name: ModelRegistry.models[name] for name in architectures()} == first


def test_concurrent_completions_equal_linspec_generate(server, completions):
    prompts, expected = completions
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: server.post("/v1/completions", completion_body(p)), prompts))
    sizes = [answer["usage"]["prompt_tokens"] for answer in answers]
    assert sum(size > WINDOW for size in sizes) >= 3 and max(sizes) + NEW_TOKENS <= MAX_MODEL_LEN, sizes
    texts = [answer["choices"][0]["text"] for answer in answers]
    assert all(same_text(t, e) for t, e in zip(texts, expected, strict=True)), list(zip(texts, expected, strict=True))


def test_concurrent_streams_concatenate_to_the_same_text(server, completions):
    prompts, expected = completions
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: server.stream("/v1/completions", completion_body(p)), prompts))
    assert all(same_text(t, e) for t, e in zip(texts, expected, strict=True)), list(zip(texts, expected, strict=True))


def test_chat_completions_use_the_models_chat_template(server, chats):
    questions, expected = chats
    for question, reply in zip(questions, expected, strict=True):
        answer = server.post("/v1/chat/completions", chat_body(question))
        assert answer["choices"][0]["message"]["content"] == reply
        assert server.stream("/v1/chat/completions", chat_body(question)) == reply


def test_a_client_hanging_up_mid_stream_frees_its_request_and_the_server_serves_on(server, completions):
    prompts, expected = completions
    connection = server.connection()
    body = completion_body(prompts[5], max_tokens=MAX_MODEL_LEN // 2, ignore_eos=True, stream=True)
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers=JSON)
    response = connection.getresponse()
    assert response.status == 200
    assert any(line.startswith(b"data: {") for line in (response.readline() for _ in range(4)))
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    # ~1000 tokens would take the server minutes here; the request must be aborted within seconds instead
    deadline = time.monotonic() + 60
    while server.running_requests() > 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.5)
    answer = server.post("/v1/completions", completion_body(prompts[5]))
    assert same_text(answer["choices"][0]["text"], expected[5])


BAD_REQUESTS = {
    "empty prompt": ("/v1/completions", completion_body("")),
    "prompt longer than max_model_len": ("/v1/completions", completion_body("word " * (2 * MAX_MODEL_LEN))),
    "temperature -1": ("/v1/completions", completion_body("Hello", temperature=-1)),
    "top_p 2": ("/v1/completions", completion_body("Hello", top_p=2)),
    "max_tokens 0": ("/v1/completions", completion_body("Hello", max_tokens=0)),
    "empty conversation": ("/v1/chat/completions", {"model": "window", "messages": [], "max_tokens": 4}),
    "chat with top_p 2": ("/v1/chat/completions", chat_body("Hello", top_p=2)),
    "unknown model": ("/v1/completions", {**completion_body("Hello"), "model": "no-such-model"}),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_are_answered_4xx_and_the_server_serves_on(server, completions, name):
    path, body = BAD_REQUESTS[name]
    status, text = server.request("POST", path, body)
    assert 400 <= status < 500, (status, text[:300])
    assert json.loads(text)["error"]["message"]
    prompts, expected = completions
    assert same_text(server.post("/v1/completions", completion_body(prompts[1]))["choices"][0]["text"], expected[1])
