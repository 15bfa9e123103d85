"""Shared by the decoder tests: scripted sessions compared against HF transformers.

`play_session` drives the slot API (prefill / decode); `play_chunked_session` drives the paged API with
prompts split into chunks mixed with decode rows. Run as a script under torchrun (`torchrun --nproc-per-node N
tests/decoder_harness.py MODEL_DIR OUT`) it plays both on N ranks and saves every rank's logits, so tests can
check TP=N against TP=1 and HF.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM
from vllm_neuron_qwen2.model.sampling import Penalties, PenaltyRow, bitmask_words

# A session over 3 of 4 slots, with prompts of exactly a bucket's length (16) and one more (17), a slot
# reused after its sequence ends, and decode steps over a subset of the slots.
PROMPT_LENGTHS = {2: 16, 0: 17, 3: 5}
DECODE_STEPS = 20
REUSED_SLOT, REUSE_AT_STEP, REUSE_PROMPT_LENGTH = 0, 8, 9
PARTIAL_STEPS = range(12, 16)  # slot 3 sits out these steps
CONFIG = dict(batch_size=4, seq_len=64, block_size=8)

# Row name -> chunk lengths, one per step, in steps 0, 1, 2, ...; after its prompt, a row decodes one token a
# step. Chunks end inside a block (13, 21, 3) and on a block edge (16); chunks of 1 ride with prompt chunks.
CHUNKS = {"a": [13, 8, 21, 3], "b": [9], "c": [0, 0, 16, 14, 1]}
CHUNKED_STEPS = 8
# Context buckets of the tiny model for play_context_session: 32, 64 and 256 positions.
CONTEXTS = dict(seq_len=256, context_lengths=[32, 64, 256])


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


def play_chunked_session(model: NeuronQwen2ForCausalLM, vocab: int, seed: int = 1):
    """Yield (row sequences so far, logits [rows, vocab]) for every step of a paged session whose prompts
    arrive in chunks (a 0-length chunk: the row has not started); tokens are teacher-forced."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {name: model.slot_blocks(slot) for slot, name in enumerate(CHUNKS)}
    seqs: dict[str, list[int]] = {name: [] for name in CHUNKS}
    for step in range(CHUNKED_STEPS):
        rows, tokens, starts = [], [], []
        for name, chunks in CHUNKS.items():
            n = chunks[step] if step < len(chunks) else 1
            if n == 0:
                continue
            new = torch.randint(0, vocab, (n,), generator=gen).tolist()
            rows.append(name)
            starts.append(len(seqs[name]))
            tokens.append(new)
            seqs[name] += new
        logits = model.step_paged(tokens=tokens, starts=starts, block_tables=[blocks[r] for r in rows])
        yield [list(seqs[r]) for r in rows], logits


def play_context_session(model: NeuronQwen2ForCausalLM, vocab: int, seed: int = 5):
    """Yield (row sequences, logits) for a paged session whose rows cross context buckets 32 -> 64 -> 256:
    a row ending exactly on a bucket edge (32), then one past it; a sequence sharing the first four blocks of
    a longer one while that one decodes in a larger bucket; and a preempted sequence prefilled again into new
    blocks beside rows decoding far beyond it. Tokens are teacher-forced."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    seqs = {"a": tokens(31), "b": tokens(5)}
    tables = {"a": list(range(1, 33)), "b": list(range(33, 65))}

    def step(chunks: dict[str, list[int]]) -> tuple[list[list[int]], torch.Tensor]:
        rows = list(chunks)
        starts = [len(seqs[r]) - len(chunks[r]) for r in rows]
        logits = model.step_paged(
            tokens=[chunks[r] for r in rows], starts=starts, block_tables=[tables[r] for r in rows]
        )
        return [list(seqs[r]) for r in rows], logits

    def grow(*rows: str) -> dict[str, list[int]]:
        for r in rows:
            seqs[r] += tokens(1)
        return {r: seqs[r][-1:] for r in rows}

    yield step({"a": seqs["a"], "b": seqs["b"]})  # both within 32
    yield step(grow("a", "b"))  # a ends exactly at 32: the 32 bucket
    yield step(grow("a", "b"))  # a at 33: the 64 bucket
    for _ in range(36):  # a crosses 64: the 256 bucket
        yield step(grow("a", "b"))
    seqs["c"], tables["c"] = seqs["a"][:32] + tokens(10), tables["a"][:4] + list(range(65, 93))
    yield step({**grow("a", "b"), "c": seqs["c"][32:]})  # c reads a's first 4 blocks, written long ago
    tables["b"] = list(range(93, 125))  # b preempted: recomputed into new blocks, prompt and outputs
    yield step({**grow("a", "c"), "b": seqs["b"]})
    for _ in range(3):
        yield step(grow("a", "b", "c"))


def play_verify_session(model: NeuronQwen2ForCausalLM, vocab: int, seed: int = 6):
    """Yield the result of every call of a session whose decode rows carry 0 to speculation_length drafts
    (verify graphs: the greedy token after each row token, on odd steps among the tokens a random bitmask
    allows, as a grammar's does, and from the third step on after penalties), crossing the 32 -> 64 context
    buckets; in two steps a prompt's chunk rides along (56 and 10 tokens). Every draft is kept,
    teacher-forced, whatever was sampled."""
    gen = torch.Generator().manual_seed(seed)
    width = 1 + model.config.speculation_length
    words = bitmask_words(model.vocab_size)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    seqs, tables = {"a": tokens(25), "b": tokens(6)}, {"a": list(range(1, 9)), "b": list(range(9, 17))}
    yield model.step_paged(tokens=list(seqs.values()), starts=[0, 0], block_tables=list(tables.values()))
    for step in range(8):
        rows = {name: tokens(1 + (step + r) % width) for r, name in enumerate(seqs)}
        starts = [len(seqs[name]) for name in rows]
        for name, new in rows.items():
            seqs[name] += new
        # prompts in the verify graphs of 64 and of 16 prompt tokens, each into blocks of its own
        chunk, first = {3: ([tokens(56)], 17), 5: ([tokens(10)], 25)}.get(step, ([], 0))
        shape = (len(rows) + len(chunk), width, words)
        # each position's penalties: its row's tokens so far, the last few as output
        listed = [
            PenaltyRow(
                (1.3, 0.5, 0.4),
                torch.tensor(sorted(set(seq[: start + j]))),
                Counter(seq[max(start + j - 4, 0) : start + j]),
            )
            for seq, start in [*zip(seqs.values(), starts, strict=True), *[(c, len(c) - 1) for c in chunk]]
            for j in range(1, width + 1)
        ]
        penalties = Penalties(*(t.view(*shape[:2], *t.shape[1:]) for t in Penalties.listed(listed)))
        yield model.verify_paged(
            tokens=[*rows.values(), *chunk],
            starts=[*starts, *[0] * len(chunk)],
            block_tables=[tables[name] for name in rows] + [list(range(first, first + 8))] * len(chunk),
            sampling=torch.zeros(len(rows) + len(chunk), width, 4),
            token_bitmask=torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32)
            if step % 2
            else None,
            penalties=penalties if step >= 2 else None,
            chunks=[len(rows)] * len(chunk),
        )


def self_repeating_token(model_dir: Path, vocab: int = 400) -> int:
    """The token a checkpoint most likes to repeat after 16 of itself: prompts of it make n-gram drafts
    (more of it) that a sampled row often accepts."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        runs = torch.arange(vocab)[:, None].expand(vocab, 16)
        probs = hf(runs).logits[:, -1].softmax(-1)
    return probs[torch.arange(vocab), torch.arange(vocab)].argmax().item()


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
    logits += [lg for _, lg in play_chunked_session(model, model.vocab_size)]
    shard = Qwen2Decoder(model.decoder.shape, model.config, model.decoder.tp)
    result = {"logits": logits, "bytes_read": load_checkpoint(shard, model_dir, progress=False)}
    torch.save(result, out.with_suffix(f".rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
