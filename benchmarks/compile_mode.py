"""Step time of the cpu backend, eager vs compiled (torch.compile), through NeuronQwen2ForCausalLM.

python benchmarks/compile_mode.py [--model DIR] [--layers 8] [--repeats 30]

Without --model a random checkpoint with Qwen2.5-0.5B's geometry is made (`tiny.make_qwen2_05b_like`). The
two modes run interleaved and the best of the repeats is reported: other processes only ever slow a run down.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vllm_neuron_qwen2.config import NeuronConfig
from vllm_neuron_qwen2.model.sampling import TEMPERATURE
from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM
from vllm_neuron_qwen2.tiny import make_qwen2_05b_like

SEQ_LEN, PROMPT = 1024, 100
CASES = [  # (label, kind, rows, attended positions, sample in the graph)
    ("decode  1 row,  256 positions, sampled", "decode", 1, 256, True),
    ("decode  4 rows, 1024 positions, sampled", "decode", 4, 1024, True),
    ("decode  4 rows, 1024 positions, logits", "decode", 4, 1024, False),
    ("prefill 1 x 100 tokens, sampled on the host", "prefill", 1, PROMPT, True),
]


def step(model: NeuronQwen2ForCausalLM, kind: str, rows: int, length: int, sample: bool) -> None:
    sampling = torch.zeros(rows, 4) if sample else None
    if sampling is not None:
        sampling[:, TEMPERATURE] = 0.0  # greedy
    if kind == "decode":
        model.decode([7] * rows, [length - 1] * rows, list(range(rows)), sampling)
    else:
        model.prefill([[7] * PROMPT] * rows, list(range(rows)), sampling)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_qwen2_05b_like(Path(tmp) / "model", num_hidden_layers=args.layers)
        config = dict(
            batch_size=4,
            seq_len=SEQ_LEN,
            max_num_batched_tokens=PROMPT,
            decode_batch_sizes=[1, 4],
            context_lengths=[256, 1024],
            compiled_artifacts=str(Path(tmp) / "graphs"),
        )
        models = {}
        for mode in ("eager", "compiled"):
            start = time.monotonic()
            models[mode] = NeuronQwen2ForCausalLM.from_pretrained(
                model_dir, NeuronConfig(compile_mode=mode, **config)
            )
            print(f"{mode}: ready in {time.monotonic() - start:.0f} s")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers")
        print(f"{'step':42} {'eager ms':>9} {'compiled ms':>12} {'compiled vs eager':>18}")
        for label, *case in CASES:
            times = {mode: [] for mode in models}
            for _ in range(args.repeats):
                for mode, model in models.items():
                    start = time.perf_counter()
                    step(model, *case)
                    times[mode].append(time.perf_counter() - start)
            eager, compiled = (min(times[m]) * 1000 for m in ("eager", "compiled"))
            print(f"{label:42} {eager:9.1f} {compiled:12.1f} {eager / compiled:17.2f}x")


if __name__ == "__main__":
    main()
