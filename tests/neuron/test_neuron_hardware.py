"""Neuron hardware tests: compile a tiny Qwen2 with the neuron backend, check prefill and decode logits vs HF;
serve it at TP 2 through vLLM's Ray executor and its default one.

It runs only where a Neuron device and the Neuron packages exist; elsewhere (including this repository's CI)
it is skipped. Run tests/test_xla_graphs.py first: the same graphs on a NeuronCore through torch-xla, without
ModelBuilder.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vllm_neuron_qwen2.config import NeuronConfig
from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM

pytestmark = pytest.mark.skipif(
    not glob.glob("/dev/neuron*"), reason="needs a Neuron device (/dev/neuron*): none on this machine"
)


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 weights and activations keep about 3 significant digits, over a 2-layer model."""
    assert got.argmax() == want.argmax()
    torch.testing.assert_close(got.float(), want, atol=0.05 * want.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("tp_degree", [1, 2])
def test_prefill_and_decode_logits_match_hf(
    make_checkpoint: Callable[..., Path], tmp_path: Path, tp_degree: int
) -> None:
    pytest.importorskip("torch_neuronx", reason="torch-neuronx is not installed")
    pytest.importorskip("neuronx_distributed", reason="neuronx-distributed is not installed")
    from transformers import Qwen2ForCausalLM

    model_dir = make_checkpoint()
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = NeuronConfig(
        batch_size=2,
        seq_len=128,
        tp_degree=tp_degree,
        backend="neuron",
        dtype="bfloat16",
        max_num_batched_tokens=16,
        prefill_lengths=[16],
        context_lengths=[128],
        compiled_artifacts=str(tmp_path / "graphs"),
    )
    model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, config)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1]
        assert_bf16_close(model.prefill([prompt], [1])[0], want)
        token = int(want.argmax())
        want = hf(torch.tensor([prompt + [token]])).logits[0, -1]
        assert_bf16_close(model.decode([token], [len(prompt)], [1])[0], want)
        # a chunk continuing the sequence in its blocks, and every position's logits from the score graph
        tail = [9, 10, 11]
        want = hf(torch.tensor([prompt + [token] + tail])).logits[0]
        blocks = model.slot_blocks(1)
        got = model.step_paged(tokens=[tail], starts=[len(prompt) + 1], block_tables=[blocks])[0]
        assert_bf16_close(got, want[-1])
        (scores,) = model.score_paged(tokens=[prompt], starts=[0], block_tables=[model.slot_blocks(0)])
        for pos in range(len(prompt)):
            assert_bf16_close(scores[pos], want[pos])


# Greedy tokens of one LLM engine at TP 2, in its own process: argv = model, executor ("" = the platform's
# default), compiled folder, prompts (JSON). Prints the tokens as JSON on its last line.
GREEDY_TP2 = """
import json, sys
from vllm import LLM, SamplingParams
model, executor, folder, prompts = sys.argv[1:]
llm = LLM(
    model=model, tensor_parallel_size=2, max_model_len=128, max_num_seqs=4, enforce_eager=True,
    distributed_executor_backend=executor or None,
    additional_config={"neuron_config": {"compiled_artifacts": folder}},
)
params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
outputs = llm.generate([{"prompt_token_ids": p} for p in json.loads(prompts)], params)
print(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
"""


def test_tp_2_over_ray_serves_the_tokens_of_the_default_executor(
    make_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """Ray reserves one `neuron_cores` unit per TP rank; rank 0 drives both (the same compiled graphs)."""
    pytest.importorskip("torch_neuronx", reason="torch-neuronx is not installed")
    pytest.importorskip("ray", reason="ray is not installed (the ray extra)")
    env = os.environ | {"VLLM_NEURON_QWEN2_BACKEND": "neuron", "HF_HUB_OFFLINE": "1"}
    prompts = json.dumps([[5 + i, 6, 7 + 2 * i, 8] for i in range(4)])
    model, folder, tokens = str(make_checkpoint()), str(tmp_path / "graphs"), {}
    for executor in ("", "ray"):
        run = subprocess.run(
            [sys.executable, "-c", GREEDY_TP2, model, executor, folder, prompts],
            env=env, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        tokens[executor] = json.loads(run.stdout.strip().splitlines()[-1])
    assert tokens["ray"] == tokens[""]
