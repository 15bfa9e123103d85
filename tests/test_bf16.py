"""bfloat16 on the cpu backend through the standalone API: prefill and 31 decode steps teacher-forced on HF
float32's greedy continuation, bounded by what vLLM's own CPU backend reaches in bfloat16 on the same
checkpoints and tokens (a recorded fixture, see bf16_errors.py; the LLM runs are in test_vllm_llm.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bf16_errors import CHECKPOINTS, assert_within_vllm_cpu, sequences, standalone_forced, token_errors

from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM, modeling
from vllm_neuron_qwen2.model import checkpoint
from vllm_neuron_qwen2.model.parallel import ShardLinear

HERE = Path(__file__).parent


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_standalone_bf16_stays_within_vllm_cpu_errors(
    make_checkpoint: Callable[..., Path], name: str
) -> None:
    model_dir = make_checkpoint(**CHECKPOINTS[name])
    assert_within_vllm_cpu(
        name, 1, token_errors(model_dir, standalone_forced(model_dir, sequences(model_dir)))
    )


def test_standalone_bf16_under_tp2(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    name = "heads14_kv2"  # 7 query heads and 1 KV head per rank
    model_dir, out = make_checkpoint(**CHECKPOINTS[name]), tmp_path / "tp2.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    subprocess.run(
        [*cmd, str(HERE / "bf16_errors.py"), str(model_dir), str(out)], check=True, env=env, timeout=600
    )
    assert_within_vllm_cpu(name, 2, token_errors(model_dir, json.loads(out.read_text())))


def test_bf16_weights_kv_cache_and_loading(
    make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bf16 checkpoint goes straight into bf16 weights (no float32 staging copies), the prepacked weights
    and the KV cache are bf16, and on a CPU without bf16 units start-up says bf16 runs slower there."""
    model_dir = make_checkpoint(dtype="bfloat16")
    staged: list[bool] = []  # per read: did it go through a staging buffer of another dtype or layout?
    read = checkpoint.SafetensorsFile._read

    def read_recording_staging(self, out: torch.Tensor, offset: int, dtype: torch.dtype) -> None:
        staged.append(out.dtype != dtype or not out.is_contiguous())
        read(self, out, offset, dtype)

    monkeypatch.setattr(checkpoint.SafetensorsFile, "_read", read_recording_staging)
    monkeypatch.setattr(modeling, "has_bf16_units", lambda: False)
    with caplog.at_level(logging.WARNING):
        model = NeuronQwen2ForCausalLM.from_pretrained(
            model_dir, NeuronConfig(batch_size=2, dtype="bfloat16")
        )
    assert staged and not any(staged), "a bf16 tensor was converted on its way into a bf16 weight"
    linears = [m for m in model.decoder.modules() if isinstance(m, ShardLinear)]
    # prepacked where the CPU can; gate_up_proj's gate and up halves apart
    weights = [
        w
        for m in linears
        for w in (getattr(m, "halves", None) or [m.weight if m.packed is None else m.packed])
    ]
    assert linears and {w.dtype for w in weights} == {torch.bfloat16}
    assert {t.dtype for t in model.decoder.kv_cache.layer(0)} == {torch.bfloat16}
    assert "without bfloat16 units" in caplog.text
    logits = model.prefill([[1, 2, 3]], [0])
    assert logits.dtype == torch.float32
