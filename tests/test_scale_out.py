"""Scaling out on vLLM's own engines: the standalone API under torchrun, pinned compiled folders, the
`vllm-neuron-qwen2 serve` launcher, and NeuronCores / CPU threads per data-parallel rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torchrun_tp_script

REPO = Path(__file__).resolve().parents[1]


def test_standalone_api_under_torchrun_equals_tp1(tiny_qwen2: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 script.py`, the script making no process group: the API starts one."""
    out = tmp_path / "logits"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(REPO / "tests" / "torchrun_tp_script.py"), str(tiny_qwen2), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialised torch.distributed (gloo) from torchrun's environment" in run.stderr
    single = torchrun_tp_script.run(str(tiny_qwen2), tp_degree=1)
    for rank in range(2):
        for a, b in zip(torch.load(f"{out}.rank{rank}.pt"), single, strict=True):
            assert a.shape == b.shape and (a - b).abs().max().item() < 2e-3
