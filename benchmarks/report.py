"""From the raw per-round results to medians per workload, the target checks, a Markdown table, a PNG plot."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.engines import engine_dtype
from benchmarks.limits import decode_bound, decode_step_bytes
from benchmarks.workload import DECODE_SHORT, Workload

ENGINES = {
    "plugin": "plugin (cpu backend)",
    "vllm-cpu": "vLLM CPU",
    "hf": "HF transformers",
    "plugin-fp32": "plugin, float32",
}
ITEMSIZE = {"float32": 4, "bfloat16": 2}
GIB = 1 << 30
PADDING_TARGET = 0.25
# plugin throughput / vLLM CPU's, per workload (the issue's targets); other workloads: 1.0
THROUGHPUT_VS_VLLM = {"default": 1.05, "chat": 1.0, "long": 1.0}
# workloads where the plugin's TTFT p50 must not exceed vLLM CPU's
TTFT_VS_VLLM = ("chat",)
# bfloat16 runs: plugin vs vLLM CPU on every workload, vs the plugin in float32, decode % of the bf16 bound
BF16_VS_VLLM, BF16_VS_FP32, BF16_DECODE_PCT = 1.0, 1.6, 60


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds of every workload and engine, start-up per engine, and the target checks."""
    rounds = raw["rounds"]
    limits = {key: _median([r["limits"].get(key) for r in rounds]) for key in rounds[0]["limits"]}
    workloads = {
        name: _summarize_workload(
            Workload.from_dict(values), [r["workloads"][name] for r in rounds], raw, limits["read_gbps"]
        )
        for name, values in raw["workloads"].items()
    }
    return {
        "limits": limits,
        "startup": _startup(raw),
        "workloads": workloads,
        "targets": [
            (name, *t)
            for name, s in workloads.items()
            for t in _targets(name, s, raw.get("dtype", "float32"))
        ],
    }


def _summarize_workload(
    w: Workload, runs_per_round: list[dict[str, Any]], raw: dict[str, Any], read_gbps: float
) -> dict[str, Any]:
    """One workload: each engine's medians over rounds, its decode bound, and the plugin's padding."""
    # The decode probe's extra steps attend, on average, to this many positions per row.
    probe = w.prompts()[: w.max_num_seqs]
    context = statistics.mean(len(p) for p in probe) + DECODE_SHORT + w.output_tokens / 2
    dtype = raw.get("dtype", "float32")

    def step_bytes(engine: str) -> dict[str, float]:
        itemsize = ITEMSIZE[engine_dtype(engine, dtype)]
        return decode_step_bytes(raw["model_config"], len(probe), context, itemsize)

    step = step_bytes("plugin")

    engines: dict[str, dict[str, Any]] = {}
    for engine in raw["engines"]:
        runs = [r[engine] for r in runs_per_round if engine in r]
        offline = [run["offline"] for run in runs]
        servers = [run["server"] for run in runs if "server" in run]
        # TTFT/TPOT: the vLLM engines' from their server, HF's from its offline generate loop
        latency = [lat for lat in servers or offline if lat.get("ttft")]
        # The host's bandwidth drifts within minutes: each decode rate is held against the bandwidth
        # measured right before and after its own job.
        gbps = [statistics.mean(o["read_gbps_around"]) for o in offline]
        pct = [
            100 * o["decode_tps"] / decode_bound(g, step_bytes(engine)["total"], len(probe))
            for o, g in zip(offline, gbps, strict=True)
        ]
        engines[engine] = {
            "throughput": _median([o["throughput"] for o in offline]),
            "decode_tps": _median([o["decode_tps"] for o in offline]),
            "decode_pct_of_bound": _median(pct),
            "read_gbps_around": _median(gbps),
            "ttft_p50": _median([float(np.percentile(lat["ttft"], 50)) for lat in latency]),
            "ttft_p99": _median([float(np.percentile(lat["ttft"], 99)) for lat in latency]),
            "tpot_p50": _median([float(np.percentile(lat["tpot"], 50)) for lat in latency]),
            "latency_source": "server" if servers else "offline loop" if latency else "not run",
            "served_throughput": _median([s["throughput"] for s in servers]),
            "prefix_cache_hit_rate": _hit_rate([o.get("prefix_cache") for o in offline]),
            "host_ms_per_step": _median([o.get("step_stats", {}).get("host_ms_per_step") for o in offline]),
            "steps": _median([o.get("step_stats", {}).get("steps") for o in offline]),
            "peak_rss_offline": max(o["peak_rss"] for o in offline),
            "peak_rss_server": max((s["peak_rss"] for s in servers), default=None),
            # average cores other processes kept busy during this engine's jobs: ~0 on a quiet machine
            "foreign_cores": max(job["foreign_cores"] for job in offline + servers),
            "ttft_all": [t for lat in latency for t in lat["ttft"]],
            "tpot_all": [t for lat in latency for t in lat["tpot"]],
        }
    return {
        "decode_context": context,
        "step_bytes": step,
        "bound_tps": decode_bound(read_gbps, step["total"], len(probe)),
        "engines": engines,
        "padding": _padding([r["plugin"]["offline"]["padding"] for r in runs_per_round if "plugin" in r]),
    }


def _hit_rate(per_round: list[dict[str, float] | None]) -> float | None:
    """Prefix-cache hits / queries (prompt tokens), summed over rounds; None when not counted."""
    counted = [c for c in per_round if c and c["queries"]]
    return sum(c["hits"] for c in counted) / sum(c["queries"] for c in counted) if counted else None


def _startup(raw: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per engine: cold = its first offline job (fresh caches), warm = the median of the later ones."""
    out = {}
    for engine in raw["engines"]:
        jobs = [
            runs[engine] for r in raw["rounds"] for runs in r["workloads"].values() if engine in runs
        ]  # in run order: rounds, then workloads
        offline = [job["offline"]["startup"] for job in jobs]
        out[engine] = {
            "cold": offline[0],
            "warm": _median(offline[1:]),
            "server": _median([job["server"]["startup"] for job in jobs if "server" in job]),
        }
    return out


def _padding(per_round: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Real and padded tokens, calls and seconds per bucket, summed over rounds, and padded/real per kind.
    (Results from before calls and seconds were counted have two values per bucket.)"""
    buckets: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for rnd in per_round:
        for key, values in rnd.items():
            for i, value in enumerate(values):
                buckets[key][i] += value
    waste = {}
    for kind in ("prefill", "decode"):
        real = sum(values[0] for key, values in buckets.items() if key.startswith(kind))
        pad = sum(values[1] for key, values in buckets.items() if key.startswith(kind))
        waste[kind] = pad / real if real else None
    return {"buckets": dict(sorted(buckets.items())), "waste": waste}


def _targets(workload: str, summary: dict[str, Any], dtype: str) -> list[tuple[str, bool | None, str]]:
    """(target, met (None when not measured), detail) for one workload."""
    engines, padding = summary["engines"], summary["padding"]
    plugin = engines.get("plugin")
    if plugin is None:
        return []
    out: list[tuple[str, bool | None, str]] = []
    vllm, hf, fp32 = engines.get("vllm-cpu"), engines.get("hf"), engines.get("plugin-fp32")
    bf16 = dtype == "bfloat16"
    if vllm:
        goal = BF16_VS_VLLM if bf16 else THROUGHPUT_VS_VLLM.get(workload, 1.0)
        ratio = plugin["throughput"] / vllm["throughput"]
        out.append((f"plugin throughput >= {goal:.2f}x vLLM CPU", ratio >= goal, f"{ratio:.2f}x"))
        if workload in TTFT_VS_VLLM:
            if plugin["ttft_p50"] is None or vllm["ttft_p50"] is None:
                out.append(("plugin TTFT p50 <= vLLM CPU's", None, "not measured (server runs skipped)"))
            else:
                ratio = plugin["ttft_p50"] / vllm["ttft_p50"]
                out.append(("plugin TTFT p50 <= vLLM CPU's", ratio <= 1.0, f"{ratio:.2f}x"))
    if hf:
        ratio = plugin["throughput"] / hf["throughput"]
        out.append(("plugin throughput >= HF transformers", ratio >= 1.0, f"{ratio:.2f}x"))
    if fp32:
        ratio = plugin["throughput"] / fp32["throughput"]
        out.append((f"plugin bf16 >= {BF16_VS_FP32}x plugin float32", ratio >= BF16_VS_FP32, f"{ratio:.2f}x"))
    pct, goal = plugin["decode_pct_of_bound"], BF16_DECODE_PCT if bf16 else 50
    out.append((f"plugin decode >= {goal}% of the bandwidth bound", pct >= goal, f"{pct:.0f}%"))
    for kind, waste in padding["waste"].items():
        met = None if waste is None else waste <= PADDING_TARGET
        detail = "not measured" if waste is None else f"{100 * waste:.1f}%"
        out.append((f"padding waste <= 25% ({kind})", met, detail))
    return out


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def _workload_table(w: Workload, summary: dict[str, Any]) -> list[str]:
    engines = summary["engines"]
    names = list(engines)

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(engines[n]) for n in names) + " |"

    def offline_loop_mark(e: dict[str, Any]) -> str:
        return " ¹" if e["latency_source"] == "offline loop" else ""

    def plugin_only(cell):
        return lambda e: cell(e) if e is engines.get("plugin") else "—"

    waste = summary["padding"]["waste"]
    step = summary["step_bytes"]
    return [
        f"### {w.name}: {w.describe()}",
        "",
        "| metric | " + " | ".join(ENGINES[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
        row("output tokens/s (offline, end to end)", lambda e: _fmt(e["throughput"], ".1f")),
        row(f"decode tokens/s at batch {w.max_num_seqs}", lambda e: _fmt(e["decode_tps"], ".1f")),
        row("read bandwidth around its job (GB/s)", lambda e: _fmt(e["read_gbps_around"], ".1f")),
        row("decode, % of the bandwidth bound then", lambda e: _fmt(e["decode_pct_of_bound"], ".0f") + "%"),
        row(
            "TTFT p50 / p99 (s)",
            lambda e: f"{_fmt(e['ttft_p50'], '.2f')} / {_fmt(e['ttft_p99'], '.2f')}" + offline_loop_mark(e),
        ),
        row("TPOT p50 (ms)", lambda e: _fmt(e["tpot_p50"], ".1f", 1e3) + offline_loop_mark(e)),
        row("output tokens/s (server, streaming)", lambda e: _fmt(e["served_throughput"], ".1f")),
        row(
            "prefix-cache hit rate (offline, prompt tokens)",
            lambda e: _fmt(e["prefix_cache_hit_rate"], ".1%"),
        ),
        row(
            "padding waste prefill / decode",
            plugin_only(lambda e: f"{_fmt(waste['prefill'], '.1%')} / {_fmt(waste['decode'], '.1%')}"),
        ),
        row(
            "host ms per step outside graph calls (steps)",
            plugin_only(lambda e: f"{_fmt(e['host_ms_per_step'], '.2f')} ({_fmt(e['steps'], '.0f')})"),
        ),
        row(
            "peak RSS offline / server (GiB)",
            lambda e: (
                f"{_fmt(e['peak_rss_offline'], '.2f', 1 / GIB)} / "
                f"{_fmt(e['peak_rss_server'], '.2f', 1 / GIB)}"
            ),
        ),
        row("other load during its jobs (cores, worst)", lambda e: _fmt(e["foreign_cores"], ".2f")),
        "",
        f"Decode bound at batch {w.max_num_seqs}: {w.max_num_seqs} x read bandwidth / "
        f"{step['total'] / 1e6:.0f} MB per step ({step['weights'] / 1e6:.0f} MB weights incl. lm_head + "
        f"{step['kv'] / 1e6:.1f} MB KV at {summary['decode_context']:.0f} positions) = "
        f"{summary['bound_tps']:.0f} tok/s at the rounds' median bandwidth.",
        "",
    ]


def markdown(raw: dict[str, Any], summary: dict[str, Any]) -> str:
    machine, limits = raw["machine"], summary["limits"]
    workloads = {name: Workload.from_dict(values) for name, values in raw["workloads"].items()}
    first = next(iter(workloads.values()))
    dtype = raw.get("dtype", "float32")
    if "plugin-fp32" in raw["engines"]:
        dtype += f" (and {ENGINES['plugin-fp32']}: the plugin in float32 in the same run)"
    lines = [
        f"Workloads {', '.join(workloads)}: ignore_eos, greedy, max_num_seqs={first.max_num_seqs}, "
        f"max_model_len={first.max_model_len}; Qwen2-0.5B geometry, {first.layers} layers, {dtype}, random "
        f"weights. Medians of {len(raw['rounds'])} rounds.",
        "",
    ]
    for name, w in workloads.items():
        lines += _workload_table(w, summary["workloads"][name])
    if "hf" in raw["engines"]:
        lines += [
            "¹ HF has no server: TTFT/TPOT from its offline generate loop (all requests at t=0, batches of "
            f"{first.max_num_seqs} one after another, one timestamp per step via a streamer).",
            "",
        ]
    startup = summary["startup"]
    lines += [
        "### Start-up (s), all workloads",
        "",
        "| engine | cold | warm | server |",
        "|---|---|---|---|",
        *(
            f"| {ENGINES[n]} | "
            + " | ".join(_fmt(s[key], ".1f") for key in ("cold", "warm", "server"))
            + " |"
            for n, s in startup.items()
        ),
        "",
        f"Limits (same run): read bandwidth {limits['read_gbps']:.1f} GB/s (1 GiB float32 sum), copy "
        f"{limits['copy_gbps_read_plus_write']:.1f} GB/s (read + write counted), float32 matmul 2048^3 "
        f"{limits['matmul_gflops']:.0f} GFLOP/s (torch default), {limits['matmul_onednn_gflops']:.0f} "
        f"GFLOP/s (oneDNN, prepacked); {int(limits['threads'])} threads; medians of the rounds. The host's "
        "bandwidth drifts within minutes, so each engine's % of the bound is the median over rounds of its "
        "decode rate against the bound from the bandwidth measured right before and after its own job (the "
        "tables' bandwidth row, mean of the two).",
        "",
        "Targets:",
        "",
    ]
    for workload, target, met, detail in summary["targets"]:
        verdict = "n/a " if met is None else ("PASS" if met else "MISS")
        lines.append(f"- {verdict} {workload}: {target}: {detail}")
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.0f} GiB RAM; "
        f"torch {machine['torch']}, vLLM {machine['vllm']}, transformers {machine['transformers']}; "
        f"{raw['started']}"
        + (f", commit {machine['git']}" if machine.get("git") else "")
        + (" + uncommitted plugin changes" if machine.get("git_dirty") else "")
        + ".",
    ]
    for name in workloads:
        buckets = summary["workloads"][name]["padding"]["buckets"]
        if buckets:
            lines += ["", f"Plugin padding and time per bucket, {name} (timed runs, all rounds):", ""]
            lines += [
                "| bucket | real tokens | padded tokens | padded / real | calls | seconds in calls |",
                "|---|---|---|---|---|---|",
            ]
            for key, (real, pad, calls, seconds) in buckets.items():
                lines.append(f"| {key} | {real} | {pad} | {pad / real:.1%} | {calls} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """One row per workload: throughput against the decode bound, TTFT and TPOT of every request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = summary["workloads"]
    fig, axes = plt.subplots(len(workloads), 3, figsize=(15, 4.5 * len(workloads)), squeeze=False)
    for (name, s), (ax_tput, ax_ttft, ax_tpot) in zip(workloads.items(), axes, strict=True):
        engines = s["engines"]
        names = list(engines)
        x = np.arange(len(names))
        ax_tput.bar(x - 0.2, [engines[n]["throughput"] for n in names], 0.4, label="offline, end to end")
        ax_tput.bar(
            x + 0.2, [engines[n]["decode_tps"] or 0 for n in names], 0.4, label="decode only, batch full"
        )
        ax_tput.axhline(s["bound_tps"], color="k", linestyle="--", label="decode bandwidth bound")
        ax_tput.set_xticks(x, [ENGINES[n] for n in names])
        ax_tput.set_ylabel("output tokens/s")
        ax_tput.set_title(f"{name}: throughput (medians)")
        ax_tput.set_ylim(0, 1.3 * max(s["bound_tps"], *(engines[n]["throughput"] for n in names)))
        ax_tput.legend(fontsize=8, loc="upper right")
        for ax, key, scale, title in (
            (ax_ttft, "ttft_all", 1.0, "TTFT (s)"),
            (ax_tpot, "tpot_all", 1e3, "TPOT (ms)"),
        ):
            data = [[v * scale for v in engines[n][key]] or [float("nan")] for n in names]
            ax.boxplot(data, whis=(1, 99))
            ax.set_xticks(
                range(1, len(names) + 1), [f"{ENGINES[n]}\n({engines[n]['latency_source']})" for n in names]
            )
            ax.set_title(f"{name}: {title}, all requests of all rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(raw: dict[str, Any], stem: Path) -> str:
    """Summarize `raw` into STEM.md (returned), STEM.png and STEM.json (raw numbers plus the summary)."""
    summary = summarize(raw)
    table = markdown(raw, summary)
    stem.with_suffix(".md").write_text(table)
    plot(summary, stem.with_suffix(".png"))
    workloads = {  # without the per-request lists: the rounds hold them already
        name: {
            **s,
            "engines": {
                engine: {k: v for k, v in e.items() if not k.endswith("_all")}
                for engine, e in s["engines"].items()
            },
        }
        for name, s in summary["workloads"].items()
    }
    stem.with_suffix(".json").write_text(
        json.dumps({**raw, "summary": {**summary, "workloads": workloads}}, indent=1)
    )
    return table


def main() -> None:
    """python -m benchmarks.report RESULTS.json: redo the summary, table and plot from its raw numbers."""
    path = Path(sys.argv[1])
    print(write(json.loads(path.read_text()), path.with_suffix("")))


if __name__ == "__main__":
    main()
