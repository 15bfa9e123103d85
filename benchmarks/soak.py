"""Soak: the plugin's OpenAI server under a bounded mixed load, then checks that nothing leaked or drifted.

python -m benchmarks.soak [--minutes 20] [--concurrency 12] [--num-blocks 41]

A tiny random Qwen2 served by the plugin's cpu backend on loopback (max_num_seqs 8, max_model_len 512) and a
KV pool of about 2.5 full-length sequences, so that vLLM must preempt. `concurrency` clients loop until the
time is up, each picking one of: a chat (the same system prompt every time, 2-4 turns that extend the
conversation), a long prompt near max_model_len, or a stream it aborts after a few chunks. Then it checks:
no request failed except the deliberate aborts; the server tree's RSS after the warm-up grew by < 5% by the
end; vLLM's KV usage is back to 0 when idle; preemptions happened; greedy probes give the same tokens before
and after. Prints the result, writes benchmarks/results/soak.{json,md}, exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from benchmarks.procs import tree_rss
from benchmarks.run import engine_env, server_args
from benchmarks.serving import SERVED_NAME, openai_server
from benchmarks.workload import PROMPT_VOCAB, Workload, made_once

HERE = Path(__file__).resolve().parent
MAX_MODEL_LEN, MAX_NUM_SEQS, BLOCK_SIZE = 512, 8, 32
DEFAULT_BLOCKS = 1 + 5 * MAX_MODEL_LEN // BLOCK_SIZE // 2  # 2.5 full sequences besides the padding block
RSS_GROWTH_LIMIT = 0.05
SYSTEM_PROMPT = (
    "You are a careful assistant for a small hardware shop. Answer in short sentences, name the part "
    "number when you know it, and ask one question back when the request is unclear. Prices are in euros "
    "and include tax. Never promise a delivery date; say that the shop will confirm it by mail."
)  # about 190 tokens with the tiny tokenizer
WORDS = "hammer nails screws drill price stock delivery glue paint brush ladder tape saw bolts".split()
CHAT_PROMPT_LIMIT = 360  # end a conversation once its prompt is this long: the next turn must still fit
PROBES = ["The quick brown fox", "Once upon a time there was", "Water boils at", "Hello! How are you today?"]
PROBE_TOKENS = 16


def metric(url: str, name: str) -> float:
    """A value on the server's /metrics, summed over its label sets (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.MULTILINE))


async def chat(client: openai.AsyncOpenAI, rng: random.Random) -> int:
    """A conversation on the shared system prompt: each turn sends the whole history plus a new message."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    turns, most = 0, rng.randint(2, 4)
    while turns < most:
        messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))})
        reply = await client.chat.completions.create(
            model=SERVED_NAME, messages=messages, max_tokens=rng.randint(8, 24), temperature=0.8, top_p=0.95
        )
        turns += 1
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        if reply.usage.prompt_tokens > CHAT_PROMPT_LIMIT:
            break
    return turns


async def long_prompt(client: openai.AsyncOpenAI, rng: random.Random) -> int:
    """A token-id prompt that, with its output, fills max_model_len to within a few tokens."""
    tokens = rng.randint(8, 32)
    prompt = [rng.randrange(PROMPT_VOCAB) for _ in range(MAX_MODEL_LEN - tokens - rng.randint(0, 24))]
    await client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=tokens, temperature=0.0, extra_body={"ignore_eos": True}
    )
    return 1


async def aborted_stream(client: openai.AsyncOpenAI, rng: random.Random) -> int:
    """A stream the client closes after a few chunks: the server must abort it and free its blocks."""
    prompt = [rng.randrange(PROMPT_VOCAB) for _ in range(rng.randint(32, 300))]
    stream = await client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=128, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = rng.randint(1, 8)
    async for _ in stream:
        chunks -= 1
        if chunks == 0:
            await stream.close()
            return 1
    raise RuntimeError("the stream ended before the client aborted it")


KINDS: dict[str, Callable[[openai.AsyncOpenAI, random.Random], Awaitable[int]]] = {
    "chat": chat,
    "long": long_prompt,
    "abort": aborted_stream,
}
WEIGHTS = {"chat": 2, "long": 1, "abort": 1}


async def load(url: str, seconds: float, concurrency: int, seed: int) -> dict[str, Any]:
    """`concurrency` clients start requests until `seconds` have passed; counts requests by kind, outcome."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    until = time.monotonic() + seconds
    outcomes: Counter[str] = Counter()
    errors: list[str] = []

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < until:
            kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            try:
                requests = await KINDS[kind](client, rng)
                outcomes[f"{kind} {'aborted' if kind == 'abort' else 'ok'}"] += requests
            except Exception as e:  # every failure is counted and reported, none may stop the soak
                outcomes[f"{kind} failed"] += 1
                errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        await client.close()
    return {"requests": dict(sorted(outcomes.items())), "errors": errors[:20], "error_count": len(errors)}


def probe(url: str) -> list[list[int]]:
    """Greedy token ids of the fixed probe prompts, one request at a time."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    out = []
    for prompt in PROBES:
        reply = client.completions.create(
            model=SERVED_NAME,
            prompt=prompt,
            max_tokens=PROBE_TOKENS,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        out.append(reply.choices[0].model_extra["token_ids"])
    return out


def wait_idle(url: str, timeout: float = 120.0) -> float:
    """Wait until no request runs or waits and the KV pool is empty; returns the KV usage seen last."""
    deadline = time.monotonic() + timeout
    while True:
        busy = metric(url, "vllm:num_requests_running") + metric(url, "vllm:num_requests_waiting")
        usage = metric(url, "vllm:kv_cache_usage_perc")
        if (busy == 0 and usage == 0) or time.monotonic() > deadline:
            return usage
        time.sleep(0.5)


def soak(opts: argparse.Namespace) -> dict[str, Any]:
    """Start the server, probe, warm up, run the load while sampling RSS, let it drain, probe again."""
    from vllm_neuron_qwen2.tiny import make_tiny_qwen2

    work = opts.work_dir.resolve()
    model = made_once(work / "tiny-qwen2", lambda out: make_tiny_qwen2(out, seed=0))
    env = engine_env("plugin", work / "cache" / "soak")
    shape = Workload(name="soak", max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN)
    cli = server_args(shape, None) + ["--num-gpu-blocks-override", str(opts.num_blocks)]
    total = 60 * opts.minutes
    warmup = min(60.0, 0.1 * total)
    with openai_server(env, str(model), cli, work / "logs" / "soak-server.log") as server:
        url = server.url
        before = probe(url)
        warm = asyncio.run(load(url, warmup, opts.concurrency, opts.seed))
        wait_idle(url)
        rss_after_warmup = tree_rss(server.pid)
        preempted = metric(url, "vllm:num_preemptions_total")
        rss_during: list[tuple[float, int]] = []  # (seconds into the timed load, bytes)

        async def load_and_sample() -> dict[str, Any]:
            task = asyncio.create_task(load(url, total - warmup, opts.concurrency, opts.seed + 1))
            began = time.monotonic()
            while not task.done():
                await asyncio.wait([task], timeout=10)
                rss_during.append((time.monotonic() - began, tree_rss(server.pid)))
            return task.result()

        timed = asyncio.run(load_and_sample())
        kv_usage = wait_idle(url)
        after = probe(url)
        return {
            "warmup": warm,
            "load": timed,
            "preemptions": metric(url, "vllm:num_preemptions_total") - preempted,
            "prefix_cache_hit_rate": metric(url, "vllm:prefix_cache_hits_total")
            / max(metric(url, "vllm:prefix_cache_queries_total"), 1),
            "kv_usage_idle": kv_usage,
            "probes_before": before,
            "probes_after": after,
            "rss_after_warmup": rss_after_warmup,
            "rss_during": rss_during,
            "rss_end": tree_rss(server.pid),  # idle, after the probes
            "server_startup": server.startup,
            "peak_rss": server.monitor.stop()["peak_rss"],
        }


def checks(result: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each of the soak's conditions."""
    requests = result["load"]["requests"]
    failed = {kind: n for kind, n in requests.items() if kind.endswith("failed")}
    base, end = result["rss_after_warmup"], result["rss_end"]
    growth = end / base - 1
    return [
        ("no request failed (aborts are expected)", not failed, json.dumps(requests)),
        (
            f"RSS after warm-up grows < {RSS_GROWTH_LIMIT:.0%}",
            growth < RSS_GROWTH_LIMIT,
            f"{base / 2**30:.2f} -> {end / 2**30:.2f} GiB ({growth:+.1%})",
        ),
        ("KV usage back to 0 when idle", result["kv_usage_idle"] == 0, f"{result['kv_usage_idle']:.3f}"),
        ("preemptions happened", result["preemptions"] > 0, f"{result['preemptions']:.0f}"),
        (
            "greedy probes unchanged",
            result["probes_before"] == result["probes_after"],
            f"{sum(a == b for a, b in zip(result['probes_before'], result['probes_after'], strict=True))}"
            f"/{len(PROBES)} equal",
        ),
    ]


def markdown(raw: dict[str, Any]) -> str:
    lines = [
        f"Soak, {raw['minutes']:g} min ({raw['started']}): tiny Qwen2, plugin cpu backend, max_num_seqs "
        f"{MAX_NUM_SEQS}, max_model_len {MAX_MODEL_LEN}, {raw['num_blocks']} KV blocks of {BLOCK_SIZE}, "
        f"{raw['concurrency']} clients; server start-up {raw['server_startup']:.1f} s, peak RSS "
        f"{raw['peak_rss'] / 2**30:.2f} GiB, prefix-cache hit rate {raw['prefix_cache_hit_rate']:.1%}.",
        "",
        "| requests (timed load) | count |",
        "|---|---|",
        *(f"| {kind} | {n} |" for kind, n in raw["load"]["requests"].items()),
        "",
        *(f"- {'PASS' if ok else 'FAIL'} {name}: {detail}" for name, ok, detail in raw["checks"]),
    ]
    if raw["load"]["errors"]:
        lines += ["", "First errors:", "", *(f"- {e}" for e in raw["load"]["errors"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20, help="whole load time, warm-up included")
    parser.add_argument("--concurrency", type=int, default=12, help="clients with a request in flight")
    parser.add_argument(
        "--num-blocks", type=int, default=DEFAULT_BLOCKS, help="--num-gpu-blocks-override (incl. block 0)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=HERE / "work", help="checkpoint, caches, logs")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where results are written")
    args = parser.parse_args()

    started = datetime.datetime.now().isoformat(timespec="seconds")
    result = soak(args)
    raw = {
        "started": started,
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "num_blocks": args.num_blocks,
        **result,
        "checks": checks(result),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(raw, indent=1))
    table = markdown(raw)
    (args.out / "soak.md").write_text(table)
    print(table)
    sys.exit(0 if all(ok for _, ok, _ in raw["checks"]) else 1)


if __name__ == "__main__":
    main()
