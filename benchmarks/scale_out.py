"""Data parallel against tensor parallel on one host: the plugin's OpenAI server as DP 1 x TP 1, DP 1 x TP 2
and DP 2 x TP 1 on the same cores, default workload, every request sent at once; medians over rounds.

python -m benchmarks.scale_out [--rounds 3] [--layers 8] [--requests N]

Each layout runs in fresh processes, in an order rotating per round. `--max-num-seqs` is per engine, so
DP 2 holds twice the rows in flight. Writes benchmarks/results/scale-out.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import procs
from benchmarks.run import engine_env, machine, server_args
from benchmarks.serving import serve_and_stream
from benchmarks.workload import WORKLOADS, checkpoint, warmup_prompts

HERE = Path(__file__).resolve().parent
LAYOUTS = {
    "DP 1 x TP 1": [],
    "DP 1 x TP 2": ["--tensor-parallel-size", "2"],
    "DP 2 x TP 1": ["--data-parallel-size", "2", "--api-server-count", "1"],
}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over rounds of one layout's throughput, TTFT and TPOT (percentiles within each round, as
    benchmarks.report computes them)."""

    def median_of(pick: Any) -> float:
        return statistics.median(float(pick(r)) for r in runs)

    return {
        "throughput": median_of(lambda r: r["throughput"]),
        "ttft_p50": median_of(lambda r: np.percentile(r["ttft"], 50)),
        "ttft_p99": median_of(lambda r: np.percentile(r["ttft"], 99)),
        "tpot_p50_ms": 1e3 * median_of(lambda r: np.percentile(r["tpot"], 50)),
        "startup": median_of(lambda r: r["startup"]),
    }


def table(summary: dict[str, dict[str, float]]) -> str:
    base = summary["DP 1 x TP 1"]["throughput"]
    lines = [
        "| layout | output tok/s | vs DP 1 x TP 1 | TTFT p50 / p99 (s) | TPOT p50 (ms) | start-up (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['throughput']:.1f} | {s['throughput'] / base:.2f}x | {s['ttft_p50']:.2f} / "
            f"{s['ttft_p99']:.2f} | {s['tpot_p50_ms']:.0f} | {s['startup']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=8, help="decoder layers of the Qwen2-0.5B-like checkpoint"
    )
    parser.add_argument("--requests", type=int, help="override the workload's request count")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=120, help="see benchmarks.run --quiet-wait")
    parser.add_argument("--work-dir", type=Path, default=HERE / "work", help="checkpoint, caches, logs")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    w = dataclasses.replace(WORKLOADS["default"], layers=args.layers)
    if args.requests:
        w = dataclasses.replace(w, requests=args.requests)
    work = args.work_dir.resolve()
    model = checkpoint(work, args.layers)
    runs_dir = work / "scale-out"
    shutil.rmtree(runs_dir, ignore_errors=True)
    raw: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.scale_out", *sys.argv[1:]]),
        "machine": machine(),
        "workload": w.to_dict(),
        "rounds": [],
    }
    names = list(LAYOUTS)
    for index in range(args.rounds):
        print(f"round {index + 1}/{args.rounds}", flush=True)
        results = {}
        for name in names[index % len(names) :] + names[: index % len(names)]:
            waited = procs.wait_until_quiet(args.quiet_wait)
            slug = name.replace(" ", "")
            env = engine_env("plugin", runs_dir / "cache" / slug)
            result = serve_and_stream(
                env,
                str(model),
                server_args(w, "float32", None) + LAYOUTS[name],
                w.prompts(),
                warmup_prompts(w),
                w.output_tokens,
                runs_dir / "logs" / f"round{index}-{slug}.log",
            )
            results[name] = {**result, "waited_for_quiet": waited}
            print(f"  {name}: {result['throughput']:.1f} tok/s, other load {result['foreign_cores']:.2f}")
        raw["rounds"].append(results)

    raw["summary"] = {name: summarize([r[name] for r in raw["rounds"]]) for name in names}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale-out.json").write_text(json.dumps(raw, indent=1))
    text = table(raw["summary"])
    host = raw["machine"]
    head = f"{w.describe()}; {args.rounds} rounds, medians; {host['cpu']}, {host['cores']} cores"
    (args.out / "scale-out.md").write_text(f"# Scale-out on one host\n\n{head}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
