"""Start-up time of the cpu backend in compiled mode: a cold start (compiles every bucket graph into an empty
artifact folder) against a warm one (same key: the folder's caches are reused).

python benchmarks/startup.py [--model DIR] [--layers 8] [--starts 2]

Each start is a fresh process (no in-memory compile caches), timed from launch to a model ready to serve
(imports, weights, graphs). Without --model a random checkpoint with Qwen2.5-0.5B's geometry is made.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(  # 11 graphs: decode 1 and 4 rows x 256 and 1024 positions, sampled or not; prefill 128 and
    # 536 tokens (512 + 3 part-filled tiles); the score graph
    batch_size=4,
    seq_len=1024,
    decode_batch_sizes=[1, 4],
    context_lengths=[256, 1024],
    max_num_batched_tokens=512,
    prefill_lengths=[128, 536],
    compile_mode="compiled",
)


def start(model_dir: str, folder: str) -> None:
    """One start, in this process: load the model and report how long that took."""
    began = time.monotonic()
    from vllm_neuron_qwen2.config import NeuronConfig
    from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

    imported = time.monotonic()
    model = NeuronQwen2ForCausalLM.from_pretrained(
        model_dir, NeuronConfig(compiled_artifacts=folder, **CONFIG)
    )
    model.decode([7], [10], [0])  # the first step runs
    ready = time.monotonic()
    print(json.dumps({"imports": imported - began, "load": ready - imported, "graphs": len(model.graphs)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--starts", type=int, default=2, help="the first is cold, the others warm")
    parser.add_argument("--start", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.start:
        start(*args.start)
        return
    from vllm_neuron_qwen2.tiny import make_qwen2_05b_like

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_qwen2_05b_like(Path(tmp) / "model", num_hidden_layers=args.layers)
        folder = Path(tmp) / "artifacts"
        times = []
        for i in range(args.starts):
            began = time.monotonic()
            out = subprocess.run(
                [sys.executable, __file__, "--start", str(model_dir), str(folder)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            times.append(time.monotonic() - began)
            report = json.loads(out.strip().splitlines()[-1])
            print(
                f"start {i + 1} ({'cold' if i == 0 else 'warm'}): {times[-1]:.1f} s "
                f"(imports {report['imports']:.1f} s, weights + {report['graphs']} graphs "
                f"{report['load']:.1f} s)",
                flush=True,
            )
        warm = min(times[1:])
        verdict = "ok" if times[0] >= 3 * warm else "FAILS the 3x target"
        print(f"cold / warm = {times[0] / warm:.1f}x ({verdict})")


if __name__ == "__main__":
    main()
