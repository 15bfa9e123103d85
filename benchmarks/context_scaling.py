"""Whether a step costs its real context or `--max-model-len`: step times with contexts held short.

python -m benchmarks.context_scaling [--layers 8] [--lengths 512 2048 8192] [--repeats 10] [--dtype float32]

For each max-model-len, the benchmark's model (8 sequences, standalone API) runs a decode step of 8 rows at
position ~200 (sampling in the graph) and a 256-token prefill at the start of a sequence. The models are
loaded side by side and timed in turns, `repeats` rounds, so that drifts of the machine hit every length
alike; values are medians. `--code DIR` times another checkout of the plugin (e.g. the previous commit, in a
git worktree) in the same way, in a subprocess, for a before / after table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.profile_decoder import timed
from benchmarks.workload import checkpoint

HERE = Path(__file__).resolve().parent
ROWS, CONTEXT, PREFILL = 8, 200, 256


def step_functions(model_dir: Path, seq_len: int, dtype: str) -> tuple[Callable[[], object], ...]:
    """A decode step of ROWS rows at about CONTEXT, and a PREFILL-token prefill at position 0."""
    from vllm_neuron_qwen2.config import NeuronConfig
    from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

    config = NeuronConfig(batch_size=ROWS, seq_len=seq_len, dtype=dtype)
    model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, config)
    greedy = torch.zeros(ROWS, 4)
    slots = list(range(ROWS))
    model.prefill([[7] * CONTEXT] * ROWS, slots, greedy)

    def decode() -> None:
        model.decode([7] * ROWS, [CONTEXT] * ROWS, slots, greedy)

    def prefill() -> None:
        model.prefill([[7] * PREFILL], [0])

    return decode, prefill


def measure(model_dir: Path, lengths: list[int], repeats: int, dtype: str) -> list[dict[str, float]]:
    steps = {n: step_functions(model_dir, n, dtype) for n in lengths}
    times: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in lengths}
    for _ in range(repeats):
        for n, (decode, prefill) in steps.items():
            times[n][0].append(timed(decode, 1))
            times[n][1].append(timed(prefill, 1))
    return [
        {
            "max_model_len": n,
            "decode_ms": 1e3 * statistics.median(times[n][0]),
            "prefill_ms": 1e3 * statistics.median(times[n][1]),
        }
        for n in lengths
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--code", type=Path, help="another checkout of the plugin to time the same way")
    parser.add_argument("--work-dir", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "context_scaling.json")
    args = parser.parse_args()

    model_dir = checkpoint(args.work_dir.resolve(), args.layers)
    runs = {"this": measure(model_dir, args.lengths, args.repeats, args.dtype)}
    if args.code:  # its vllm_neuron_qwen2 first on the path; this file's `measure`
        script = (
            "import importlib.util, json, sys; from pathlib import Path; import vllm_neuron_qwen2 as p; "
            "assert p.__file__.startswith(sys.argv[5]), p.__file__; "
            "spec = importlib.util.spec_from_file_location('scaling', sys.argv[6]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "a = sys.argv; print(json.dumps(m.measure(Path(a[1]), json.loads(a[2]), int(a[3]), a[4])))"
        )
        code = str(args.code.resolve())
        out = subprocess.run(
            [sys.executable, "-c", script, str(model_dir), json.dumps(args.lengths), str(args.repeats),
             args.dtype, code, __file__],
            env=os.environ | {"PYTHONPATH": code}, cwd=code, check=True, capture_output=True, text=True,
        )  # fmt: skip
        runs[str(args.code)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| code | max-model-len | decode 8 rows at ~{CONTEXT} (ms) | {PREFILL}-token prefill (ms) |")
    print("|---|---|---|---|")
    for code, results in runs.items():
        for r in results:
            print(f"| {code} | {r['max_model_len']} | {r['decode_ms']:.1f} | {r['prefill_ms']:.1f} |")
        first, last = results[0], results[-1]
        decode, prefill = last["decode_ms"] / first["decode_ms"], last["prefill_ms"] / first["prefill_ms"]
        lengths = f"{last['max_model_len']} / {first['max_model_len']}"
        print(f"| {code} | {lengths} | {decode:.2f}x | {prefill:.2f}x |")
    result = {"dtype": args.dtype, "layers": args.layers, "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
