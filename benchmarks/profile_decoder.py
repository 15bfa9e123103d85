"""Where the plugin's decode and prefill time goes: torch.profiler over the cpu backend's bucket graphs,
outside vLLM (so that the difference to the benchmark's decode rate is engine overhead).

python -m benchmarks.profile_decoder [--layers 8] [--batch 8] [--context 160] [--prompt 128] [--repeats 20]
                                     [--dtype float32|bfloat16]

The model is built as the benchmark's vLLM engine builds it (batch_size = max_num_seqs, seq_len =
max_model_len, default buckets, in-graph greedy sampling), from the same cached checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.limits import decode_step_bytes, measure
from benchmarks.workload import checkpoint, model_geometry

HERE = Path(__file__).resolve().parent

# aten ops grouped into what they do, for the summary lines
GROUPS = {
    "linear": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "sampling (topk)": ("aten::topk", "aten::sort", "aten::cumsum", "aten::softmax", "aten::_softmax"),
    "KV cache index": ("aten::index", "aten::index_put", "aten::index_select", "aten::index_copy"),
}


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def profile(fn: Callable[[], object], label: str, repeats: int) -> dict[str, float]:
    """Print the top ops by self CPU time and return self CPU ms per call for each op group."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    averages = prof.key_averages()
    print(f"\n== {label}: top ops by self CPU time ({repeats} calls)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
    groups: dict[str, float] = defaultdict(float)
    for event in averages:
        group = next((g for g, names in GROUPS.items() if event.key.startswith(names)), "other")
        groups[group] += event.self_cpu_time_total / 1e3 / repeats
    return dict(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="max_num_seqs: slots and full decode batch")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--context", type=int, default=160, help="decode position of every row")
    parser.add_argument("--prompt", type=int, default=128, help="prefill prompt length (one row)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=HERE / "work")
    parser.add_argument("--compile-mode", default="eager", choices=["eager", "compiled"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    from vllm_neuron_qwen2.config import NeuronConfig
    from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

    model_dir = checkpoint(args.work_dir.resolve(), args.layers)
    config = NeuronConfig(
        batch_size=args.batch,
        seq_len=args.max_model_len,
        compile_mode=args.compile_mode,
        dtype=args.dtype,
        compiled_artifacts=str(args.work_dir.resolve() / "cache" / "profile"),
    )
    model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, config)
    greedy = torch.zeros(args.batch, 4)  # temperature 0: the in-graph sampler takes the argmax
    rows = list(range(args.batch))

    def decode() -> None:
        model.decode([7] * args.batch, [args.context] * args.batch, rows, greedy)

    def prefill() -> None:
        model.prefill([[7] * args.prompt], [0], greedy[:1])

    limits = measure()
    hf = model_geometry(model_dir)
    step = decode_step_bytes(hf, args.batch, args.context + 1, dtype.itemsize)
    decode_s, prefill_s = timed(decode, args.repeats), timed(prefill, args.repeats)
    bound_s = step["total"] / (limits["read_gbps"] * 1e9)
    print(
        f"{args.dtype}; read bandwidth {limits['read_gbps']:.1f} GB/s, float32 matmul "
        f"{limits['matmul_gflops']:.0f} GFLOP/s\n"
        f"decode {args.batch} rows at position {args.context}: {decode_s * 1e3:.1f} ms/step = "
        f"{args.batch / decode_s:.0f} tok/s; bandwidth bound {bound_s * 1e3:.1f} ms/step "
        f"({step['total'] / 1e6:.0f} MB) -> {100 * bound_s / decode_s:.0f}% of bound\n"
        f"prefill 1 x {args.prompt} tokens: {prefill_s * 1e3:.1f} ms = {args.prompt / prefill_s:.0f} tok/s"
    )

    # The decoder's own projections alone, on a decode step's input: how fast they stream their weights.
    decoder, layer = model.decoder, model.decoder.layers[0]
    h, inter, vocab = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    kv = hf["num_key_value_heads"] * h // hf["num_attention_heads"]
    parts = {  # name: (module, input features, weight elements)
        "lm_head": (decoder.lm_head, h, vocab * h),
        "gate_up_proj": (layer.mlp.gate_up_proj, h, 2 * inter * h),
        "down_proj": (layer.mlp.down_proj, inter, h * inter),
        "qkv_proj": (layer.self_attn.qkv_proj, h, (h + 2 * kv) * h),
    }
    with torch.inference_mode():
        for name, (module, features, elements) in parts.items():
            x = torch.rand(args.batch, 1, features, dtype=dtype)
            seconds = timed(lambda m=module, x=x: m(x), args.repeats)
            gbps = elements * dtype.itemsize / seconds / 1e9
            print(f"{name} alone: {seconds * 1e3:.2f} ms = {gbps:.1f} GB/s of weights")

    for label, fn, total in (("decode", decode, decode_s), ("prefill", prefill, prefill_s)):
        groups = profile(fn, label, args.repeats)
        parts = ", ".join(f"{g} {ms:.1f} ms" for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]))
        print(f"{label} {total * 1e3:.1f} ms per call (wall); self CPU by group: {parts}")


if __name__ == "__main__":
    main()
