"""A user's script, `torchrun --nproc-per-node N tests/torchrun_tp_script.py MODEL_DIR OUT`: nothing but
the public API (no process group of its own). Every rank saves the logits of a prefill and a decode step."""

import logging
import os
import sys

import torch

from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]


def run(model_dir: str, tp_degree: int) -> list[torch.Tensor]:
    config = NeuronConfig(batch_size=2, seq_len=64, tp_degree=tp_degree, backend="cpu")
    model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, config)
    first = model.prefill(PROMPTS, seq_ids=[0, 1])
    tokens = first.argmax(-1).tolist()
    second = model.decode(tokens, position_ids=[len(p) for p in PROMPTS], seq_ids=[0, 1])
    return [first, second]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logits = run(sys.argv[1], tp_degree=int(os.environ["WORLD_SIZE"]))
    torch.save(logits, f"{sys.argv[2]}.rank{os.environ['RANK']}.pt")
