"""Neuron hardware test: compile a tiny Qwen2 with the neuron backend, check prefill and decode logits vs HF.

It runs only where a Neuron device exists; elsewhere (including this repository's CI) it is skipped.
"""

from __future__ import annotations

import glob
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
        prefill_lengths=[24],  # 16 tokens + one part-filled tile
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
