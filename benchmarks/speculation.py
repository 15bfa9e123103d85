"""n-gram speculative decoding against vLLM's CPU backend with the same speculative config, in the same run.

python -m benchmarks.speculation [--layers 8] [--drafts 2 4] [--repeats 10]

Two workloads, 96 greedy output tokens per request, 8 sequences at a time, max-model-len 512, float32:
`span`, 16 requests, each a random span of 24-48 tokens repeated 4 times (text that copies itself, as in code
edits and retrieval answers; a random-weight model rarely continues it, so drafts are rarely accepted), and
`repeat`, 16 prompts of the checkpoint's greedy fixed-point token (a model that copies perfectly).
Each engine runs both once per K (0: no speculation) in a fresh process, after a warm-up on other prompts.
Reported: throughput, vLLM's draft and acceptance counters (acceptance rate, mean tokens per row step), and,
on the plugin's standalone API, the time of a verify call of 8 rows x (1 + K) tokens over a decode call of 8
rows at ~position 200. From `plan`'s bytes per call for Qwen2-7B at TP 2 in bf16, it projects the decode
speed-up on a NeuronCore, where a call streams the weights and costs its bytes: tokens per step / (verify
bytes / decode bytes). That is a projection, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import procs
from benchmarks.engines import EXPECTED_PLATFORM
from benchmarks.profile_decoder import timed
from benchmarks.run import engine_env
from benchmarks.workload import PROMPT_VOCAB, checkpoint

HERE = Path(__file__).resolve().parent
REQUESTS, SPAN, REPEATS, OUTPUT, SEQS, MAX_LEN = 16, (24, 48), 4, 96, 8, 512
ROWS, CONTEXT = 8, 200


def span_prompts(seed: int) -> list[list[int]]:
    """Random spans repeated: drafts come from the prompt; a random-weight model rarely continues them."""
    rng = random.Random(seed)
    spans = [[rng.randrange(PROMPT_VOCAB) for _ in range(rng.randint(*SPAN))] for _ in range(REQUESTS)]
    return [span * REPEATS for span in spans]


def repeat_prompts(token: int, seed: int) -> list[list[int]]:
    """The checkpoint's greedy fixed point repeated: a model that copies its context perfectly (every draft
    accepted), the other end from `span_prompts`."""
    rng = random.Random(seed)
    return [[token] * rng.randint(32, 64) for _ in range(REQUESTS)]


def fixed_point_token(model_dir: Path) -> int:
    """The token the model most surely repeats after 16 of itself, among those whose greedy next token is
    itself."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        runs = torch.arange(PROMPT_VOCAB)[:, None].expand(PROMPT_VOCAB, 16)
        last = torch.cat([model(runs[i : i + 50]).logits[:, -1] for i in range(0, PROMPT_VOCAB, 50)])
    ids = torch.arange(PROMPT_VOCAB)
    self_prob = last.softmax(-1)[ids, ids].masked_fill(last.argmax(-1) != ids, -1)
    if self_prob.max() < 0:
        raise SystemExit(f"{model_dir}: no token is its own greedy successor; try another --layers")
    return int(self_prob.argmax())


WORKLOADS = {
    "span": "16 prompts, each a random 24-48-token span 4 times (random weights: drafts rarely accepted)",
    "repeat": "16 prompts of 32-64 times the checkpoint's greedy fixed-point token (every draft accepted)",
}


def ngram(k: int) -> dict[str, Any] | None:
    return (
        {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
        if k
        else None
    )


SPEC_COUNTERS = ("drafts", "draft_tokens", "accepted_tokens")  # vllm:spec_decode_num_<name>


def spec_counters(llm: Any) -> dict[str, float]:
    names = {f"vllm:spec_decode_num_{name}": name for name in SPEC_COUNTERS}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def speculation_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine at one K, in the process `python -m benchmarks.engines speculation` (launched by `run`)."""
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    llm = LLM(
        model=spec["model"],
        dtype="float32",  # vLLM CPU would pick bf16, slow on CPUs without bf16 units
        max_model_len=MAX_LEN,
        max_num_seqs=SEQS,
        seed=0,
        disable_log_stats=False,
        speculative_config=ngram(spec["k"]),
    )
    platform = type(current_platform).__name__
    if platform != EXPECTED_PLATFORM[spec["engine"]]:
        raise RuntimeError(
            f"{spec['engine']}: vLLM chose {platform}, expected {EXPECTED_PLATFORM[spec['engine']]}"
        )
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in span_prompts(1)[:SEQS]], params, use_tqdm=False)
    results = {}
    for name, prompts in (("span", span_prompts(0)), ("repeat", repeat_prompts(spec["repeat_token"], 0))):
        counters = spec_counters(llm)
        began = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - began
        after = spec_counters(llm)
        results[name] = {
            "seconds": elapsed,
            "throughput": REQUESTS * OUTPUT / elapsed,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            **{name: after[name] - counters.get(name, 0) for name in after},
        }
    return results


def verify_over_decode(model_dir: Path, drafts: list[int], repeats: int) -> dict[int, float]:
    """Standalone: a verify call of ROWS rows x (1 + K) tokens over a decode call of ROWS rows, both at
    about CONTEXT (medians of `repeats` turns)."""
    from vllm_neuron_qwen2.config import NeuronConfig
    from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

    k_max = max(drafts)
    config = NeuronConfig(batch_size=ROWS, seq_len=MAX_LEN, speculation_length=k_max)
    model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, config)
    slots = list(range(ROWS))
    model.prefill([[7] * CONTEXT] * ROWS, slots, torch.zeros(ROWS, 4))
    tables = [model.slot_blocks(s) for s in slots]

    def verify(k: int) -> None:
        model.verify_paged(
            tokens=[[7] * (1 + k)] * ROWS,
            starts=[CONTEXT] * ROWS,
            block_tables=tables,
            sampling=torch.zeros(ROWS, 1 + k_max, 4),
        )

    def decode() -> None:
        model.decode([7] * ROWS, [CONTEXT] * ROWS, slots, torch.zeros(ROWS, 4))

    times: dict[int, list[float]] = {k: [] for k in [0, *drafts]}
    for _ in range(repeats):
        times[0].append(timed(decode, 1))
        for k in drafts:
            times[k].append(timed(lambda k=k: verify(k), 1))
    return {k: statistics.median(times[k]) / statistics.median(times[0]) for k in drafts}


def projected_bytes(drafts: list[int]) -> dict[int, float]:
    """Bytes a verify call moves over a decode call's (8 rows at 2048 positions), Qwen2-7B, TP 2, bf16."""
    from vllm_neuron_qwen2.compile.buckets import Bucket
    from vllm_neuron_qwen2.compile.costs import RankShape, traffic
    from vllm_neuron_qwen2.config import NeuronConfig, Qwen2Shape
    from vllm_neuron_qwen2.tiny import QWEN2_7B

    shape = Qwen2Shape.from_dict(QWEN2_7B)
    config = NeuronConfig(batch_size=ROWS, seq_len=2048, tp_degree=2, dtype="bfloat16", backend="neuron")
    rank = RankShape.of(shape, config.resolve(shape))
    decode = traffic(Bucket(ROWS, 0, 2048, True), rank, config.block_size).total
    return {
        k: traffic(Bucket(ROWS, 0, 2048, True, row_tokens=1 + k), rank, config.block_size).total / decode
        for k in drafts
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = checkpoint(args.work_dir.resolve(), args.layers)
    repeat_token = fixed_point_token(model_dir)
    logs = args.work_dir / "logs" / "speculation"
    logs.mkdir(parents=True, exist_ok=True)
    engines: dict[str, dict[int, dict[str, Any]]] = {}
    for engine in ("plugin", "vllm-cpu"):
        engines[engine] = {}
        for k in [0, *args.drafts]:
            spec = {"model": str(model_dir), "k": k, "engine": engine, "repeat_token": repeat_token}
            env = engine_env(engine, args.work_dir / "cache" / engine)
            engines[engine][k] = procs.run_job("speculation", spec, env, logs / f"{engine}-k{k}.log", 3600)
            speeds = ", ".join(f"{w} {engines[engine][k][w]['throughput']:.1f} tok/s" for w in WORKLOADS)
            print(f"{engine} K={k}: {speeds}", flush=True)
    return {
        "repeat_token": repeat_token,
        "engines": engines,
        "verify_over_decode": verify_over_decode(model_dir, args.drafts, args.repeats),
        "projected_bytes": projected_bytes(args.drafts),
    }


def tokens_per_step(r: dict[str, Any]) -> float:
    """Tokens a row gains per step that checks drafts: 1 + accepted drafts per draft run."""
    return 1 + r.get("accepted_tokens", 0) / r["drafts"] if r.get("drafts") else 1.0


def report(result: dict[str, Any]) -> str:
    engines, verify = result["engines"], result["verify_over_decode"]
    lines = []
    for workload in WORKLOADS:
        lines += [
            f"{workload}: {WORKLOADS[workload]}",
            "",
            "| engine | K | tok/s | vs K=0 | vs vLLM CPU, same K | acceptance | tokens per row step "
            "| verify / decode call |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for engine, runs in engines.items():
            for k, by_workload in runs.items():
                r = by_workload[workload]
                drafted = r.get("draft_tokens", 0)
                acceptance = f"{r['accepted_tokens'] / drafted:.0%}" if drafted else "-"
                per_step = f"{tokens_per_step(r):.2f}" if k else "-"
                call = f"{verify[k]:.2f}x" if engine == "plugin" and k else "-"
                vs_off = r["throughput"] / runs[0][workload]["throughput"]
                vs_vllm = r["throughput"] / engines["vllm-cpu"][k][workload]["throughput"]
                speed = f"{r['throughput']:.1f} | {vs_off:.2f}x | {vs_vllm:.2f}x"
                lines.append(f"| {engine} | {k} | {speed} | {acceptance} | {per_step} | {call} |")
        lines.append("")
    lines += [
        "| K | verify / decode bytes (Qwen2-7B, TP 2, bf16, 8 rows at 2048) | decode speed-up on Neuron, "
        "projected at the measured acceptance: span / repeat |",
        "|---|---|---|",
    ]
    for k, ratio in result["projected_bytes"].items():
        gains = " / ".join(f"{tokens_per_step(engines['plugin'][k][w]) / ratio:.2f}x" for w in WORKLOADS)
        lines.append(f"| {k} | {ratio:.4f}x | {gains} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--drafts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speculation.json")
    args = parser.parse_args()
    result = run(args)
    for engine, runs in result["engines"].items():
        for workload in WORKLOADS:
            for k, by_workload in runs.items():
                same = by_workload[workload]["tokens"] == runs[0][workload]["tokens"]
                assert same, f"{engine} {workload} K={k}: greedy output changed with speculation"
        for by_workload in runs.values():
            for workload in WORKLOADS:
                del by_workload[workload]["tokens"]
    text = report(result)
    print(text)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
