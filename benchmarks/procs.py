"""Child processes: launch in their own process group, watch the tree's peak RSS, always clean up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _own_seconds() -> float:
    t = psutil.Process().cpu_times()  # this process: the benchmark's driver and streaming client
    return t.user + t.system


def _summed_rss(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of a process and all its descendants; shared pages count once per process."""
    root = psutil.Process(pid)
    return _summed_rss([root, *root.children(recursive=True)])


class TreeMonitor(threading.Thread):
    """Samples a process and all its descendants (engine core, workers) until stopped: their summed RSS
    (pages shared between them count once per process: an upper estimate) and their CPU time, so that
    the CPU time everything else on the machine used meanwhile (`foreign_cores`: neither the tree nor
    this driver process) can be reported.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._cpu: dict[int, float] = {}  # pid -> CPU seconds last seen
        self._began, self._busy, self._own = time.monotonic(), _busy_seconds(), _own_seconds()
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in tree:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    cpu = proc.cpu_times()
                    self._cpu[proc.pid] = cpu.user + cpu.system
            self.peak = max(self.peak, _summed_rss(tree))
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, float]:
        """Peak RSS (bytes) and the average number of cores other processes kept busy."""
        self._stop_event.set()
        self.join()
        wall = time.monotonic() - self._began
        ours = sum(self._cpu.values()) + _own_seconds() - self._own
        foreign = _busy_seconds() - self._busy - ours
        return {"peak_rss": self.peak, "foreign_cores": max(foreign, 0.0) / wall}


def wait_until_quiet(max_wait: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Wait (at most `max_wait` s) for a `window` in which the machine keeps under `threshold` cores busy,
    so that a job does not start while another program is running; returns the seconds waited."""
    began = time.monotonic()
    cores = psutil.cpu_count() or 1
    while time.monotonic() - began < max_wait:
        if psutil.cpu_percent(interval=window) / 100 * cores < threshold:
            break
    return time.monotonic() - began


def launch(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `cmd` from the repo root, output to `log`, in a new session so that its whole tree can be
    signalled (vLLM's engine core is a grandchild)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGINT the group (vLLM shuts down cleanly on it), then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def run_job(job: str, spec: dict[str, Any], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run `python -m benchmarks.engines JOB` on `spec`; returns its JSON result plus the tree's usage
    (`peak_rss`, `foreign_cores`)."""
    spec_path, out_path = log.with_suffix(".spec.json"), log.with_suffix(".out.json")
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.unlink(missing_ok=True)
    spec = {**spec, "launched": time.monotonic()}  # CLOCK_MONOTONIC is system-wide: the child reads it too
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks.engines", job, str(spec_path), str(out_path)]
    proc = launch(cmd, env, log)
    monitor = TreeMonitor(proc.pid)
    monitor.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        usage = monitor.stop()
        stop(proc)
    if code != 0 or not out_path.is_file():
        tail = log.read_text()[-3000:] if log.is_file() else ""
        reason = "timed out" if code is None else f"exited with {code}"
        raise RuntimeError(f"{job} {reason}; log {log}:\n{tail}")
    return {**json.loads(out_path.read_text()), **usage}
