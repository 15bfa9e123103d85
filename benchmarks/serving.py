"""The streaming run: one vLLM OpenAI server (loopback), every request sent at once with the `openai` client.

TTFT = first streamed token - request sent; TPOT = (last token - first token) / (tokens - 1), per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from benchmarks import procs

SERVED_NAME = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: Any, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not healthy after {timeout:.0f} s; log {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


async def _one(client: openai.AsyncOpenAI, prompt: list[int], tokens: int) -> dict[str, float]:
    sent = time.perf_counter()
    stream = await client.completions.create(
        model=SERVED_NAME,
        prompt=prompt,
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
        # return_token_ids: chunks carry their token ids, so tokens are counted even when their text is empty
        # (random weights emit ids the tiny tokenizer cannot spell).
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    first = last = 0.0
    count = 0
    async for chunk in stream:
        for choice in chunk.choices:
            ids = (choice.model_extra or {}).get("token_ids") or []
            if ids:
                last = time.perf_counter()
                first = first or last
                count += len(ids)
    if count != tokens:
        raise RuntimeError(f"streamed {count} tokens, expected {tokens}")
    return {"ttft": first - sent, "tpot": (last - first) / max(count - 1, 1), "end": last}


async def _all_at_once(url: str, prompts: list[list[int]], tokens: int, timeout: float) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)
    try:
        began = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(_one(client, p, tokens) for p in prompts)), timeout=timeout
        )
    finally:
        await client.close()
    return {
        "ttft": [r["ttft"] for r in results],
        "tpot": [r["tpot"] for r in results],
        "throughput": len(prompts) * tokens / (max(r["end"] for r in results) - began),
    }


@dataclass
class Server:
    url: str
    pid: int
    startup: float  # seconds from launch to /health OK
    monitor: procs.TreeMonitor  # the server's process tree (peak RSS, other load) since launch


@contextlib.contextmanager
def openai_server(
    env: dict[str, str], model: str, args: list[str], log: Path, timeout: float = 900.0
) -> Iterator[Server]:
    """A vLLM OpenAI server on a free loopback port, healthy on entry, always stopped on exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME, *args]
    launched = time.monotonic()
    proc = procs.launch(cmd, env, log)
    monitor = procs.TreeMonitor(proc.pid)
    monitor.start()
    try:
        _wait_healthy(url, proc, log, timeout)
        yield Server(url, proc.pid, time.monotonic() - launched, monitor)
    finally:
        monitor.stop()
        procs.stop(proc)


def serve_and_stream(
    env: dict[str, str],
    model: str,
    args: list[str],
    prompts: list[list[int]],
    warmup: list[list[int]],
    tokens: int,
    log: Path,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Start a server, time it to healthy, warm it up, run the streaming workload, always kill it."""
    with openai_server(env, model, args, log, timeout) as server:
        asyncio.run(_all_at_once(server.url, warmup, 4, timeout))
        result = asyncio.run(_all_at_once(server.url, prompts, tokens, timeout))
        usage = server.monitor.stop()
    return {**result, "startup": server.startup, **usage}
