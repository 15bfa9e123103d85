"""Shared by the decoder tests: a scripted prefill/decode session compared against HF transformers.

Run as a script under torchrun (`torchrun --nproc-per-node N tests/decoder_harness.py MODEL_DIR OUT`) it plays
the same session on N ranks and saves every rank's logits, so tests can check TP=N against TP=1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM

# A session over 3 of 4 slots, with prompts of exactly a bucket's length (16) and one more (17), a slot
# reused after its sequence ends, and decode steps over a subset of the slots.
PROMPT_LENGTHS = {2: 16, 0: 17, 3: 5}
DECODE_STEPS = 20
REUSED_SLOT, REUSE_AT_STEP, REUSE_PROMPT_LENGTH = 0, 8, 9
PARTIAL_STEPS = range(12, 16)  # slot 3 sits out these steps
CONFIG = dict(batch_size=4, seq_len=64, prefill_lengths=[8, 16, 32, 64], decode_lengths=[16, 32, 64])


def play_session(model: NeuronQwen2ForCausalLM, vocab: int, seed: int = 0):
    """Yield (row sequences, logits [rows, vocab]) for every model call; tokens are teacher-forced."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    seqs = {slot: tokens(n) for slot, n in PROMPT_LENGTHS.items()}
    slots = list(seqs)
    yield [seqs[s] for s in slots], model.prefill([seqs[s] for s in slots], slots)
    for step in range(DECODE_STEPS):
        if step == REUSE_AT_STEP:  # the sequence in this slot ended; a new one takes the slot
            seqs[REUSED_SLOT] = tokens(REUSE_PROMPT_LENGTH)
            yield [seqs[REUSED_SLOT]], model.prefill([seqs[REUSED_SLOT]], [REUSED_SLOT])
        active = [s for s in slots if not (step in PARTIAL_STEPS and s == 3)]
        for s in active:
            seqs[s].append(tokens(1)[0])
        logits = model.decode([seqs[s][-1] for s in active], [len(seqs[s]) - 1 for s in active], active)
        yield [list(seqs[s]) for s in active], logits


def load(model_dir: Path, tp_degree: int = 1, **overrides) -> NeuronQwen2ForCausalLM:
    return NeuronQwen2ForCausalLM.from_pretrained(
        model_dir, NeuronConfig(tp_degree=tp_degree, **CONFIG | overrides)
    )


if __name__ == "__main__":
    import torch.distributed as dist

    from vllm_neuron_qwen2.model.checkpoint import load_checkpoint
    from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder

    dist.init_process_group("gloo")
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = load(model_dir, tp_degree=dist.get_world_size())
    logits = [lg for _, lg in play_session(model, model.vocab_size)]
    shard = Qwen2Decoder(model.decoder.shape, model.config, model.decoder.tp)
    result = {"logits": logits, "bytes_read": load_checkpoint(shard, model_dir, progress=False)}
    torch.save(result, out.with_suffix(f".rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
