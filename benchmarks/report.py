"""From the raw per-round results to medians, the target checks, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.limits import decode_bound, decode_step_bytes
from benchmarks.workload import DECODE_SHORT, Workload

ENGINES = {"plugin": "plugin (cpu backend)", "vllm-cpu": "vLLM CPU", "hf": "HF transformers"}
GIB = 1 << 30
PADDING_TARGET = 0.25


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds per engine, the decode bound, padding per bucket and the target checks."""
    w = Workload.from_dict(raw["workload"])
    rounds = raw["rounds"]
    limits = {key: _median([r["limits"].get(key) for r in rounds]) for key in rounds[0]["limits"]}
    # The decode probe's extra steps attend, on average, to this many positions per row.
    probe = w.prompts()[: w.max_num_seqs]
    context = statistics.mean(len(p) for p in probe) + DECODE_SHORT + w.output_tokens / 2
    step = decode_step_bytes(raw["model_config"], len(probe), context)
    bound = decode_bound(limits["read_gbps"], step["total"], len(probe))

    def engine_gbps(rnd: dict[str, Any], engine: str) -> float:
        """Bandwidth drifts within minutes on a shared host, so each decode rate is held against the
        bandwidth measured right around its own job (older results: its round's limits)."""
        around = rnd[engine]["offline"].get("read_gbps_around")
        return statistics.mean(around) if around else rnd["limits"]["read_gbps"]

    engines: dict[str, dict[str, Any]] = {}
    for engine in raw["engines"]:
        runs = [r[engine] for r in rounds if engine in r]
        offline = [run["offline"] for run in runs]
        # TTFT/TPOT: the vLLM engines' from their server, HF's from its offline generate loop
        latency = [run["server"] for run in runs if "server" in run] or offline
        latency = [lat for lat in latency if lat.get("ttft")]
        startups = [o["startup"] for o in offline]
        decode = _median([o["decode_tps"] for o in offline])
        gbps = [engine_gbps(r, engine) for r in rounds if engine in r]
        pct = [
            100 * o["decode_tps"] / decode_bound(g, step["total"], len(probe))
            for o, g in zip(offline, gbps, strict=True)
        ]
        engines[engine] = {
            "throughput": _median([o["throughput"] for o in offline]),
            "decode_tps": decode,
            "decode_pct_of_bound": _median(pct),
            "read_gbps_around": _median(gbps),
            "ttft_p50": _median([float(np.percentile(lat["ttft"], 50)) for lat in latency]),
            "ttft_p99": _median([float(np.percentile(lat["ttft"], 99)) for lat in latency]),
            "tpot_p50": _median([float(np.percentile(lat["tpot"], 50)) for lat in latency]),
            "latency_source": (
                "server" if any("server" in run for run in runs) else "offline loop" if latency else "not run"
            ),
            "served_throughput": _median([run["server"]["throughput"] for run in runs if "server" in run]),
            "startup_cold": startups[0],
            "startup_warm": _median(startups[1:]),
            "server_startup": _median([run["server"]["startup"] for run in runs if "server" in run]),
            "peak_rss_offline": max(o["peak_rss"] for o in offline),
            "peak_rss_server": max(
                (run["server"]["peak_rss"] for run in runs if "server" in run), default=None
            ),
            # average cores other processes kept busy during this engine's jobs: ~0 on a quiet machine
            "foreign_cores": max(
                job["foreign_cores"] for run in runs for job in run.values() if "foreign_cores" in job
            ),
            "ttft_all": [t for lat in latency for t in lat["ttft"]],
            "tpot_all": [t for lat in latency for t in lat["tpot"]],
        }

    padding = _padding([r["plugin"]["offline"]["padding"] for r in rounds if "plugin" in r])
    return {
        "limits": limits,
        "decode_context": context,
        "step_bytes": step,
        "bound_tps": bound,
        "engines": engines,
        "padding": padding,
        "targets": _targets(engines, padding),
    }


def _padding(per_round: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Real and padded tokens per bucket, summed over rounds, and padded/real per kind."""
    buckets: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rnd in per_round:
        for key, (real, pad) in rnd.items():
            buckets[key][0] += real
            buckets[key][1] += pad
    waste = {}
    for kind in ("prefill", "decode"):
        real = sum(r for key, (r, _) in buckets.items() if key.startswith(kind))
        pad = sum(p for key, (_, p) in buckets.items() if key.startswith(kind))
        waste[kind] = pad / real if real else None
    return {"buckets": dict(sorted(buckets.items())), "waste": waste}


def _targets(engines: dict[str, Any], padding: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, met; None when not measured, detail) for the issue's four targets."""
    plugin = engines.get("plugin")
    if plugin is None:
        return []
    out: list[tuple[str, bool | None, str]] = []
    vllm, hf = engines.get("vllm-cpu"), engines.get("hf")
    if vllm:
        ratio = plugin["throughput"] / vllm["throughput"]
        out.append(("plugin throughput >= 1.5x vLLM CPU", ratio >= 1.5, f"{ratio:.2f}x"))
    if hf:
        ratio = plugin["throughput"] / hf["throughput"]
        out.append(("plugin throughput >= HF transformers", ratio >= 1.0, f"{ratio:.2f}x"))
    pct = plugin["decode_pct_of_bound"]
    out.append(("plugin decode >= 50% of the bandwidth bound", pct >= 50, f"{pct:.0f}%"))
    for kind, waste in padding["waste"].items():
        met = None if waste is None else waste <= PADDING_TARGET
        detail = "not measured" if waste is None else f"{100 * waste:.1f}%"
        out.append((f"padding waste <= 25% ({kind})", met, detail))
    return out


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def markdown(raw: dict[str, Any], summary: dict[str, Any]) -> str:
    w, machine = Workload.from_dict(raw["workload"]), raw["machine"]
    engines = summary["engines"]
    names = list(engines)
    limits, bound = summary["limits"], summary["bound_tps"]

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(engines[n]) for n in names) + " |"

    lines = [
        f"Workload: {w.requests} requests, prompts {w.min_prompt}-{w.max_prompt} tokens (uniform, seed "
        f"{w.seed}), {w.output_tokens} output tokens each (ignore_eos, greedy), "
        f"max_num_seqs={w.max_num_seqs}, max_model_len={w.max_model_len}; "
        f"Qwen2-0.5B geometry, {w.layers} layers, float32, random weights. "
        f"Medians of {len(raw['rounds'])} rounds.",
        "",
        "| metric | " + " | ".join(ENGINES[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
        row("output tokens/s (offline, end to end)", lambda e: _fmt(e["throughput"], ".1f")),
        row(f"decode tokens/s at batch {w.max_num_seqs}", lambda e: _fmt(e["decode_tps"], ".1f")),
        row("read bandwidth around its job (GB/s)", lambda e: _fmt(e["read_gbps_around"], ".1f")),
        row("decode, % of the bandwidth bound then", lambda e: _fmt(e["decode_pct_of_bound"], ".0f") + "%"),
        row(
            "TTFT p50 / p99 (s)",
            lambda e: (
                f"{_fmt(e['ttft_p50'], '.2f')} / {_fmt(e['ttft_p99'], '.2f')}"
                + (" ¹" if e["latency_source"] == "offline loop" else "")
            ),
        ),
        row(
            "TPOT p50 (ms)",
            lambda e: (
                _fmt(e["tpot_p50"], ".1f", 1e3) + (" ¹" if e["latency_source"] == "offline loop" else "")
            ),
        ),
        row("output tokens/s (server, streaming)", lambda e: _fmt(e["served_throughput"], ".1f")),
        row(
            "start-up cold / warm (s)",
            lambda e: f"{_fmt(e['startup_cold'], '.1f')} / {_fmt(e['startup_warm'], '.1f')}",
        ),
        row("server start-up (s)", lambda e: _fmt(e["server_startup"], ".1f")),
        row(
            "peak RSS offline / server (GiB)",
            lambda e: (
                f"{_fmt(e['peak_rss_offline'], '.2f', 1 / GIB)} / "
                f"{_fmt(e['peak_rss_server'], '.2f', 1 / GIB)}"
            ),
        ),
    ]
    lines.append(row("other load during its jobs (cores, worst)", lambda e: _fmt(e["foreign_cores"], ".2f")))
    waste = summary["padding"]["waste"]
    if "plugin" in engines:
        lines.append(
            row(
                "padding waste prefill / decode",
                lambda e: (
                    f"{_fmt(waste['prefill'], '.1%')} / {_fmt(waste['decode'], '.1%')}"
                    if e is engines["plugin"]
                    else "—"
                ),
            )
        )
    if "hf" in engines:
        lines += [
            "",
            "¹ HF has no server: TTFT/TPOT from its offline generate loop (all requests at t=0, batches of "
            f"{w.max_num_seqs} one after another, one timestamp per step via a streamer).",
        ]
    step = summary["step_bytes"]
    lines += [
        "",
        f"Limits (same run): read bandwidth {limits['read_gbps']:.1f} GB/s (1 GiB float32 sum), copy "
        f"{limits['copy_gbps_read_plus_write']:.1f} GB/s (read + write counted), float32 matmul 2048^3 "
        f"{limits['matmul_gflops']:.0f} GFLOP/s (torch default)"
        + (
            f", {limits['matmul_onednn_gflops']:.0f} GFLOP/s (oneDNN, prepacked)"
            if limits.get("matmul_onednn_gflops")
            else ""
        )
        + f"; {int(limits['threads'])} threads; medians of the rounds. "
        f"Decode bound at batch {w.max_num_seqs}: {w.max_num_seqs} x {limits['read_gbps']:.1f} GB/s / "
        f"{step['total'] / 1e6:.0f} MB per step ({step['weights'] / 1e6:.0f} MB weights incl. lm_head + "
        f"{step['kv'] / 1e6:.1f} MB KV at {summary['decode_context']:.0f} positions) = {bound:.0f} tok/s. "
        "The host's bandwidth drifts within minutes, so each engine's % is the median over rounds of its "
        "decode rate against the bound from the bandwidth measured right before and after its own job "
        "(the table's bandwidth row, mean of the two).",
        "",
        "Targets:",
        "",
    ]
    for target, met, detail in summary["targets"]:
        verdict = "n/a " if met is None else ("PASS" if met else "MISS")
        lines.append(f"- {verdict} {target}: {detail}")
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.0f} GiB RAM; "
        f"torch {machine['torch']}, vLLM {machine['vllm']}, transformers {machine['transformers']}; "
        f"{raw['started']}"
        + (f", commit {machine['git']}" if machine.get("git") else "")
        + (" + uncommitted plugin changes" if machine.get("git_dirty") else "")
        + ".",
    ]
    buckets = summary["padding"]["buckets"]
    if buckets:
        lines += ["", "Plugin padding per bucket (timed runs, all rounds):", ""]
        lines += ["| bucket | real tokens | padded tokens | padded / real |", "|---|---|---|---|"]
        for key, (real, pad) in buckets.items():
            lines.append(f"| {key} | {real} | {pad} | {pad / real:.1%} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = summary["engines"]
    names = list(engines)
    labels = [ENGINES[n] for n in names]
    fig, (ax_tput, ax_ttft, ax_tpot) = plt.subplots(1, 3, figsize=(15, 4.5))

    x = np.arange(len(names))
    ax_tput.bar(x - 0.2, [engines[n]["throughput"] for n in names], 0.4, label="offline, end to end")
    ax_tput.bar(x + 0.2, [engines[n]["decode_tps"] or 0 for n in names], 0.4, label="decode only, batch full")
    ax_tput.axhline(summary["bound_tps"], color="k", linestyle="--", label="decode bandwidth bound")
    ax_tput.set_xticks(x, labels)
    ax_tput.set_ylabel("output tokens/s")
    ax_tput.set_title("Throughput (medians)")
    ax_tput.set_ylim(0, 1.3 * max(summary["bound_tps"], *(engines[n]["throughput"] for n in names)))
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
        ax.set_title(f"{title}, all requests of all rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(raw: dict[str, Any], stem: Path) -> str:
    """Summarize `raw` into STEM.md (returned), STEM.png and STEM.json (raw numbers plus the summary)."""
    summary = summarize(raw)
    table = markdown(raw, summary)
    stem.with_suffix(".md").write_text(table)
    plot(summary, stem.with_suffix(".png"))
    engines = {  # without the per-request lists: the rounds hold them already
        name: {k: v for k, v in e.items() if not k.endswith("_all")} for name, e in summary["engines"].items()
    }
    stem.with_suffix(".json").write_text(
        json.dumps({**raw, "summary": {**summary, "engines": engines}}, indent=1)
    )
    return table


def main() -> None:
    """python -m benchmarks.report RESULTS.json: redo the summary, table and plot from its raw numbers."""
    path = Path(sys.argv[1])
    print(write(json.loads(path.read_text()), path.with_suffix("")))


if __name__ == "__main__":
    main()
