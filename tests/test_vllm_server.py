"""vLLM's OpenAI server on the vllm-neuron-qwen2 platform (cpu backend), driven by the `openai` client.

The server is started by the test (`python -m vllm.entrypoints.openai.api_server ... --device neuron`) on a
free loopback port, in its own process group, and always killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

MAX_MODEL_LEN = 128
PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was",
    "What is the capital of France?",
    "A computer runs programs",
    "Hello! How are you today?",
    "Water boils at",
    "The children played on the beach",
    "Please tell me a short story",
]


@dataclass
class Server:
    url: str
    model: str
    proc: subprocess.Popen

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_server_cmd(model_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *args]


def server_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "VLLM_NEURON_QWEN2_BACKEND": "cpu", "HF_HUB_OFFLINE": "1", **extra}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop(proc: subprocess.Popen) -> bool:
    """Ctrl-C the server as a user would; True when its whole process group then exits by itself.

    Whatever is left afterwards is SIGKILLed, so no test run leaks a server.
    """
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    clean = not _group_alive(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return clean


@pytest.fixture(scope="module")
def server(
    make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    model_dir = make_checkpoint()
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--device", "neuron", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4", "--enforce-eager"]
    # a random model under a JSON grammar would pad with whitespace; vLLM can forbid it for xgrammar
    args += ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            vllm_server_cmd(model_dir, *args),
            env=server_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() can check and reach the engine core
        )
    srv = Server(f"http://127.0.0.1:{port}", str(model_dir), proc)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"server not healthy:\n{log_path.read_text()[-4000:]}"
            try:
                if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield srv
    finally:
        clean = stop(proc)
    assert clean, "server processes left behind after Ctrl-C"
    assert "Cannot access accelerator" not in log_path.read_text()


def greedy_completion(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 16) -> str:
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == max_tokens
    return out.choices[0].text


def test_completion_chat_and_streaming(server: Server) -> None:
    client = server.client()
    text = greedy_completion(client, server.model, PROMPTS[0])
    assert text

    # stop strings are the engine's job; check they reach the output through this platform too
    stop = re.search(r"[a-z]{3,}", text[1:]).group()
    stopped = client.completions.create(
        model=server.model,
        prompt=PROMPTS[0],
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop, 1)]

    streamed = client.completions.create(
        model=server.model,
        prompt=PROMPTS[0],
        max_tokens=16,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == text

    with_logprobs = client.completions.create(
        model=server.model, prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=2
    )
    assert all(len(top) == 2 for top in with_logprobs.choices[0].logprobs.top_logprobs)

    chat = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hello! How are you today?"}],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 10
    chat_stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hello! How are you today?"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    deltas = "".join(chunk.choices[0].delta.content or "" for chunk in chat_stream if chunk.choices)
    assert deltas == chat.choices[0].message.content


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "count"],
    "additionalProperties": False,
}


def test_structured_outputs_echo_and_prompt_logprobs(server: Server) -> None:
    client = server.client()
    schema = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    for temperature in (0.0, 1.0):
        reply = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "Answer in JSON."}],
            response_format=schema,
            max_tokens=40,
            temperature=temperature,
        )
        value = json.loads(reply.choices[0].message.content)
        assert value["answer"] in ("yes", "no") and 0 <= value["count"] <= 9
    for constraint, check in (
        ({"regex": "[a-c]{3}-[0-9]{2}"}, lambda t: re.fullmatch("[a-c]{3}-[0-9]{2}", t)),
        ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ):
        streamed = client.completions.create(
            model=server.model,
            prompt=PROMPTS[2],
            max_tokens=20,
            temperature=1.0,
            stream=True,
            extra_body={"structured_outputs": constraint},
        )
        assert check("".join(chunk.choices[0].text for chunk in streamed))
    # echo with logprobs scores the prompt: its first token has no logprob, every other one does
    ids = [5, 80, 120, 7, 42, 300, 9]
    echoed = client.completions.create(
        model=server.model, prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.token_logprobs) == len(ids) + 2


async def _load(server: Server, expected: list[str]) -> int:
    """64 concurrent streams; every fourth is dropped after its first chunk. Returns how many were aborted.

    The first chunk, not a later one: under load the server may pack a whole completion into two chunks.
    """
    client = server.async_client()

    async def one(i: int) -> bool:
        stream = await client.completions.create(
            model=server.model,
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = []
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            if i % 4 == 0:
                await stream.close()  # client disconnect: the server aborts the request
                return True
        assert "".join(pieces) == expected[i % len(PROMPTS)]
        return False

    aborted = await asyncio.gather(*(one(i) for i in range(64)))
    await client.close()
    return sum(aborted)


def metric(server: Server, name: str) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", metrics, re.MULTILINE)
    assert values, f"{name} missing from /metrics"
    return sum(float(v) for v in values)


def running_requests(server: Server) -> float:
    return metric(server, "vllm:num_requests_running")


def test_prefix_cache_hits_show_in_metrics(server: Server) -> None:
    # a chat's system prompt is cached once and reused: vLLM counts the hits, the KV pool drains after
    client = server.client()
    system = "You are a terse assistant who answers every question in exactly one short sentence."
    hits = metric(server, "vllm:prefix_cache_hits_total")
    answers = [
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        .choices[0]
        .message.content
        for question in ("Why?", "Why?", "How far is the moon?")
    ]
    assert answers[0] == answers[1]
    assert metric(server, "vllm:prefix_cache_hits_total") - hits >= 2 * 32  # at least a block per repeat
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0


def test_concurrent_requests_with_aborts(server: Server) -> None:
    client = server.client()
    before = [greedy_completion(client, server.model, p) for p in PROMPTS]
    assert asyncio.run(_load(server, before)) == 16
    after = [greedy_completion(client, server.model, p) for p in PROMPTS]
    assert after == before
    deadline = time.monotonic() + 30
    while running_requests(server) != 0:
        assert time.monotonic() < deadline, "requests still running after the load"
        time.sleep(0.5)


BAD_REQUESTS = {
    "prompt over max_model_len": {"prompt": [5] * (MAX_MODEL_LEN + 10), "max_tokens": 4},
    "negative max_tokens": {"prompt": "hi", "max_tokens": -1},
    "unknown model": {"prompt": "hi", "max_tokens": 4, "model": "no-such-model"},
    "negative temperature": {"prompt": "hi", "max_tokens": 4, "temperature": -0.5},
    "out-of-vocab token ids": {"prompt": [1, 99999], "max_tokens": 4},
    "prompt_logprobs beyond the vocabulary": {"prompt": "hi", "max_tokens": 4, "prompt_logprobs": 10**6},
    "invalid JSON schema": {
        "prompt": "hi",
        "max_tokens": 4,
        "structured_outputs": {"json": {"type": "nope"}},
    },
    "invalid regex": {"prompt": "hi", "max_tokens": 4, "structured_outputs": {"regex": "(unclosed"}},
    "invalid grammar": {"prompt": "hi", "max_tokens": 4, "structured_outputs": {"grammar": "root ::= ("}},
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_4xx_and_server_keeps_serving(server: Server, case: str) -> None:
    body = {"model": server.model, **BAD_REQUESTS[case]}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]
    assert greedy_completion(server.client(), server.model, PROMPTS[0], max_tokens=2)


def test_malformed_json_is_4xx(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions",
        content=b'{"model": "x", "prompt": ',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.text
    assert greedy_completion(server.client(), server.model, PROMPTS[0], max_tokens=2)


@pytest.mark.parametrize(
    ("device", "env", "message"),
    [
        ("cpu", {"VLLM_NEURON_QWEN2_BACKEND": "cpu"}, "neuron"),
        ("neuron", {"VLLM_NEURON_QWEN2_BACKEND": ""}, "VLLM_NEURON_QWEN2_BACKEND"),
    ],
)
def test_device_flag(tiny_qwen2: Path, device: str, env: dict[str, str], message: str) -> None:
    if Path("/dev/neuron0").exists():
        pytest.skip("a Neuron device activates the plugin regardless of the variable")
    result = subprocess.run(
        vllm_server_cmd(tiny_qwen2, "--device", device, "--port", str(free_port())),
        env=server_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
