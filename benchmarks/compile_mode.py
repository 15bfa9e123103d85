"""Step time of the cpu backend, eager vs compiled (torch.compile), at the `long` workload's shapes.

python -m benchmarks.compile_mode [--dtype float32|bfloat16] [--layers 8] [--repeats 30]

The benchmark checkpoint, 8 sequences, max-model-len 512, a ladder of just the graphs the cases use: a decode
step of 8 rows at position 400 (greedy, sampled in the graph) and one 440-token prompt. Both modes prepack the
linears (oneDNN); the compiled graphs call them as opaque ops and fuse the rest. The modes run interleaved and
the median of the repeats is reported. Compiling takes about 20 s a graph on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.workload import checkpoint
from vllm_neuron_qwen2.config import NeuronConfig
from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

HERE = Path(__file__).resolve().parent
ROWS, SEQ_LEN, POSITION, PROMPT = 8, 512, 400, 440


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--work-dir", type=Path, default=HERE / "work")
    args = parser.parse_args()
    model_dir = checkpoint(args.work_dir.resolve(), args.layers)
    greedy = torch.zeros(ROWS, 4)  # temperature 0
    cases = {
        f"decode {ROWS} rows at position {POSITION}, sampled": lambda m: m.decode(
            [7] * ROWS, [POSITION] * ROWS, list(range(ROWS)), greedy
        ),
        f"prefill 1 x {PROMPT} tokens": lambda m: m.prefill([[7] * PROMPT], [0]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for mode in ("eager", "compiled"):
            config = NeuronConfig(
                batch_size=ROWS, seq_len=SEQ_LEN, dtype=args.dtype, decode_batch_sizes=[ROWS],
                prefill_lengths=[SEQ_LEN], compile_mode=mode, compiled_artifacts=str(Path(tmp) / mode),
            )  # fmt: skip
            start = time.monotonic()
            models[mode] = NeuronQwen2ForCausalLM.from_pretrained(model_dir, config)
            print(f"{mode}: ready in {time.monotonic() - start:.0f} s")
        threads = torch.get_num_threads()
        print(f"torch {torch.__version__}, {threads} threads, {args.layers} layers, {args.dtype}")
        print(f"{'step':42} {'eager ms':>9} {'compiled ms':>12} {'eager / compiled':>17}")
        for label, step in cases.items():
            times = {mode: [] for mode in models}
            for _ in range(args.repeats):
                for mode, model in models.items():
                    start = time.perf_counter()
                    step(model)
                    times[mode].append(time.perf_counter() - start)
            eager, compiled = (statistics.median(times[m]) * 1000 for m in ("eager", "compiled"))
            print(f"{label:42} {eager:9.1f} {compiled:12.1f} {eager / compiled:16.2f}x")


if __name__ == "__main__":
    main()
