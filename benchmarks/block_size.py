"""How the KV block size changes the plugin's step times and the chat workload's prefix-cache hits.

python -m benchmarks.block_size [--layers 8] [--sizes 16 32 64 128] [--repeats 10]

For each block size, the benchmark's model (8 rows, 512 tokens) runs: a decode step of 8 rows at position 200,
and a prefill step of a 256-token chunk with 7 decode rows alongside. The models are loaded side by side and
timed in turns, `repeats` rounds, so that drifts of the machine hit every size alike; values are medians.
The hit column is what vLLM's prefix cache can reuse of a chat prompt (a 320-token system prompt plus 16-48
tokens): whole blocks only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.profile_decoder import timed
from benchmarks.workload import checkpoint

HERE = Path(__file__).resolve().parent
ROWS, SEQ_LEN, CONTEXT, CHUNK = 8, 512, 200, 256
SYSTEM_PROMPT, USER_TOKENS = 320, (16, 48)


def chat_hit_rate(block_size: int) -> float:
    """Mean share of a chat prompt served from cached whole blocks (vLLM keeps the last token uncached)."""
    rates = []
    for user in range(USER_TOKENS[0], USER_TOKENS[1] + 1):
        prompt = SYSTEM_PROMPT + user
        rates.append(min(SYSTEM_PROMPT, prompt - 1) // block_size * block_size / prompt)
    return sum(rates) / len(rates)


def step_functions(model_dir: Path, block_size: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """A decode step and a mixed prefill step of the benchmark's model with this block size."""
    from vllm_neuron_qwen2.config import NeuronConfig
    from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

    model = NeuronQwen2ForCausalLM.from_pretrained(
        model_dir, NeuronConfig(batch_size=ROWS, seq_len=SEQ_LEN, block_size=block_size)
    )
    greedy = torch.zeros(ROWS, 4)
    slots = list(range(ROWS))
    model.prefill([[7] * CONTEXT] * ROWS, slots, greedy)

    def decode() -> None:
        model.decode([7] * ROWS, [CONTEXT] * ROWS, slots, greedy)

    def mixed() -> None:
        model.step(
            input_ids=[7] * (ROWS - 1),
            position_ids=[CONTEXT] * (ROWS - 1),
            seq_ids=slots[1:],
            prompts=[[7] * CHUNK],
            prompt_seq_ids=[0],
        )

    return decode, mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "block_size.json")
    args = parser.parse_args()

    model_dir = checkpoint(args.work_dir.resolve(), args.layers)
    steps = {size: step_functions(model_dir, size) for size in args.sizes}
    times: dict[int, tuple[list[float], list[float]]] = {size: ([], []) for size in args.sizes}
    for _ in range(args.repeats):
        for size, (decode, mixed) in steps.items():
            times[size][0].append(timed(decode, 1))
            times[size][1].append(timed(mixed, 1))
    results = [
        {
            "block_size": size,
            "decode_ms": 1e3 * statistics.median(times[size][0]),
            "prefill_ms": 1e3 * statistics.median(times[size][1]),
            "chat_hit_rate": chat_hit_rate(size),
        }
        for size in args.sizes
    ]
    print("| block size | decode 8 rows (ms) | 256-token chunk + 7 rows (ms) | chat prompt from cache |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['block_size']} | {r['decode_ms']:.1f} | {r['prefill_ms']:.1f} | "
            f"{100 * r['chat_hit_rate']:.0f}% |"
        )
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
