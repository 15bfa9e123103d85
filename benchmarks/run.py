"""Benchmark: this plugin's cpu backend against vLLM's own CPU backend and HF transformers, same checkpoint,
same prompts, each engine in its own processes, alternating over several rounds; medians reported.

python -m benchmarks.run [--workload default|chat|long|long8k|all] [--layers 8] [--requests N]
                         [--prompt-len MIN MAX] [--output-tokens N] [--max-num-seqs 8] [--max-model-len L]
                         [--rounds 3]
                         [--engines plugin,vllm-cpu,hf]

Writes benchmarks/results/benchmark.{md,json,png} and prints the table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import procs, report
from benchmarks.engines import PLUGIN_ENGINES, engine_dtype
from benchmarks.serving import serve_and_stream
from benchmarks.workload import WORKLOADS, Workload, checkpoint, model_geometry, warmup_prompts
from vllm_neuron_qwen2 import ARTIFACTS_ENV, BACKEND_ENV

HERE = Path(__file__).resolve().parent
OFFLINE_TIMEOUT = 3600.0


def engine_env(engine: str, cache: Path) -> dict[str, str]:
    """The environment of one engine's processes; its compile caches live in `cache`."""
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}  # unset: the plugin stays inactive
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(procs.ROOT), os.environ.get("PYTHONPATH")])),
        VLLM_CACHE_ROOT=str(cache / "vllm"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
    )
    if engine in PLUGIN_ENGINES:
        env[BACKEND_ENV] = "cpu"
        env[ARTIFACTS_ENV] = str(cache / "artifacts")
    elif engine == "vllm-cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; its default sizing wants more RAM than this box has free
        # vLLM CPU reserves one of the two cores for its front end by default; give its model both, as the
        # other engines have (measured faster at decode on this box).
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env


def machine() -> dict[str, Any]:
    import psutil
    import torch
    import transformers
    import vllm

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": psutil.virtual_memory().total / (1 << 30),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": _git("rev-parse", "--short", "HEAD"),
        # uncommitted changes to the plugin at the start (the editable install runs the working tree)
        "git_dirty": _git("status", "--porcelain", "--", "vllm_neuron_qwen2").splitlines(),
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=procs.ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def server_args(w: Workload, dtype: str, extra: dict[str, Any] | None) -> list[str]:
    args = ["--dtype", dtype, "--max-model-len", str(w.max_model_len)]
    args += ["--max-num-seqs", str(w.max_num_seqs), "--seed", "0"]
    if extra:
        args += ["--additional-config", json.dumps(extra)]
    return args


def run_engine(
    engine: str, w: Workload, model: Path, work: Path, logs: Path, opts: argparse.Namespace
) -> dict[str, Any]:
    """One engine on one workload: its offline job between two bandwidth measurements, then its server run."""
    spec = {"workload": w.to_dict(), "model": str(model), "dtype": engine_dtype(engine, opts.dtype)}
    env = engine_env(engine, work / "cache" / engine)
    plugin_config = opts.plugin_config if engine in PLUGIN_ENGINES else None
    llm_args = {"additional_config": plugin_config} if plugin_config else {}
    waited = procs.wait_until_quiet(opts.quiet_wait)
    # The VM's bandwidth drifts within minutes: measure it right before and after the engine's job.
    before = procs.run_job("bandwidth", spec, dict(os.environ), logs / f"{engine}-bw-before.log", 600)
    offline = procs.run_job(
        engine, {**spec, "llm_args": llm_args}, env, logs / f"{engine}-offline.log", OFFLINE_TIMEOUT
    )
    after = procs.run_job("bandwidth", spec, dict(os.environ), logs / f"{engine}-bw-after.log", 600)
    bandwidth = [before["read_gbps"], after["read_gbps"]]
    result = {"offline": {**offline, "waited_for_quiet": waited, "read_gbps_around": bandwidth}}
    line = f"{offline['throughput']:.1f} tok/s, decode {offline['decode_tps']:.1f} tok/s"
    line += f" (read bandwidth {bandwidth[0]:.1f} / {bandwidth[1]:.1f} GB/s before / after)"
    line += f", start-up {offline['startup']:.1f} s, other load {offline['foreign_cores']:.2f} cores"
    if not opts.no_server and engine not in ("hf", "plugin-fp32"):  # the float32 plugin: throughput only
        waited = procs.wait_until_quiet(opts.quiet_wait)
        args = server_args(w, spec["dtype"], plugin_config)
        server = serve_and_stream(
            env,
            str(model),
            args,
            w.prompts(),
            warmup_prompts(w),
            w.output_tokens,
            logs / f"{engine}-server.log",
        )
        result["server"] = {**server, "waited_for_quiet": waited}
        line += f"; server TTFT p50 {sorted(server['ttft'])[len(server['ttft']) // 2]:.2f} s"
        line += f", other load {server['foreign_cores']:.2f} cores"
    print(f"  {w.name} {engine}: {line}", flush=True)
    return result


def run_round(
    index: int, workloads: list[Workload], model: Path, work: Path, opts: argparse.Namespace
) -> dict[str, Any]:
    """One round: the limits, then every workload on every engine, the first engine rotating per round."""
    logs = work / "logs" / f"round{index}"
    waited = procs.wait_until_quiet(opts.quiet_wait)
    limits = procs.run_job("limits", {}, dict(os.environ), logs / "limits.log", 600)
    limits["waited_for_quiet"] = waited
    print(f"  limits: {json.dumps({k: round(v, 2) for k, v in limits.items()})}", flush=True)
    engines = opts.engines[index % len(opts.engines) :] + opts.engines[: index % len(opts.engines)]
    return {
        "limits": limits,
        "workloads": {
            w.name: {engine: run_engine(engine, w, model, work, logs / w.name, opts) for engine in engines}
            for w in workloads
        },
    }


def chosen_workloads(args: argparse.Namespace) -> list[Workload]:
    """The --workload choice, with the command line's overrides applied to each."""
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    overrides = {"layers": args.layers, "max_num_seqs": args.max_num_seqs, "seed": args.seed}
    if args.max_model_len is not None:
        overrides["max_model_len"] = args.max_model_len
    if args.requests is not None:
        overrides["requests"] = args.requests
    if args.prompt_len is not None:
        overrides["min_prompt"], overrides["max_prompt"] = args.prompt_len
    if args.output_tokens is not None:
        overrides["output_tokens"] = args.output_tokens
    workloads = [dataclasses.replace(WORKLOADS[name], **overrides) for name in names]
    for w in workloads:
        w.check()
    return workloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=8, help="decoder layers of the Qwen2-0.5B-like checkpoint"
    )
    parser.add_argument(
        "--workload",
        choices=[*WORKLOADS, "all"],
        default="all",
        help="which workload(s) to run (default all)",
    )
    parser.add_argument("--requests", type=int, help="override every chosen workload's request count")
    parser.add_argument(
        "--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"),
        help="override the prompt lengths (chat: the tokens after the shared prefix)",
    )  # fmt: skip
    parser.add_argument("--output-tokens", type=int, help="override the output tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, help="override (default: 512, long8k 8192)")
    parser.add_argument("--seed", type=int, default=0, help="prompt lengths and token ids")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="of every engine; with bfloat16 the plugin also runs in float32 (engine plugin-fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--engines", help="comma-separated subset, in this order (default plugin,vllm-cpu,hf and, in "
        "bfloat16, plugin-fp32)"
    )  # fmt: skip
    parser.add_argument("--no-server", action="store_true", help="skip the streaming (TTFT/TPOT) runs")
    parser.add_argument(
        "--plugin-config", type=json.loads, help="JSON for the plugin's --additional-config, e.g. "
        '\'{"neuron_config": {"compile_mode": "compiled"}}\''
    )  # fmt: skip
    parser.add_argument(
        "--quiet-wait", type=float, default=120, help="before each job, wait up to this many seconds "
        "for the machine to be idle (other programs distort 2-core results); 0 disables"
    )  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=HERE / "work", help="checkpoint, caches, logs")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where results are written")
    parser.add_argument("--name", default="benchmark", help="file name stem of the results")
    args = parser.parse_args()

    default_engines = "plugin,vllm-cpu,hf" + (",plugin-fp32" if args.dtype == "bfloat16" else "")
    args.engines = engines = (args.engines or default_engines).split(",")
    unknown = set(engines) - set(report.ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {list(report.ENGINES)}")
    workloads = chosen_workloads(args)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = checkpoint(work, args.layers)
    # A fresh cache per engine: the first start of round 0 is the cold start.
    shutil.rmtree(work / "cache", ignore_errors=True)
    shutil.rmtree(work / "logs", ignore_errors=True)

    raw: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *sys.argv[1:]]),
        "machine": machine(),
        "dtype": args.dtype,
        "workloads": {w.name: w.to_dict() for w in workloads},
        "model_config": model_geometry(model),
        "engines": engines,
        "plugin_config": args.plugin_config,
        "rounds": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    for index in range(args.rounds):
        print(f"round {index + 1}/{args.rounds}", flush=True)
        raw["rounds"].append(run_round(index, workloads, model, work, args))
        stem.with_suffix(".json").write_text(json.dumps(raw, indent=1))  # partial results survive a crash

    table = report.write(raw, stem)
    print()
    print(table)
    print(f"written: {stem}.md, {stem}.json, {stem}.png")


if __name__ == "__main__":
    main()
