"""Speculative decoding: verify graphs against HF transformers, the n-gram proposer, the acceptance rule."""

from __future__ import annotations

import pytest
import torch
from decoder_harness import CONTEXTS, load
from test_compile import plan
from transformers import Qwen2ForCausalLM

from vllm_neuron_qwen2.compile.artifacts import check_compatible
from vllm_neuron_qwen2.config import ConfigError, NeuronConfig, Qwen2Shape
from vllm_neuron_qwen2.speculation import NgramProposer, accepted_tokens

TOL = 2e-3
K = 3


def greedy(hf: Qwen2ForCausalLM, seq: list[int], n: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(hf(torch.tensor([seq + out])).logits[0, -1].argmax().item())
    return out


def test_verify_graph_checks_drafts_like_hf_greedy(make_checkpoint):
    # rows carrying 0..K drafts, the first m of them HF's own greedy tokens and the rest wrong, cross the
    # 32 -> 64 -> 256 context buckets; every token the graph samples is HF's argmax after the row's tokens
    # before it, and a rejected draft's K/V (written, never accepted) is overwritten by the next step
    model_dir = make_checkpoint(num_attention_heads=4, num_key_value_heads=2)
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load(model_dir, **CONTEXTS, speculation_length=K)
    gen = torch.Generator().manual_seed(7)
    seqs = {"a": torch.randint(0, 400, (27,), generator=gen).tolist(), "b": [5, 6, 7]}
    tables = {"a": list(range(1, 33)), "b": list(range(33, 65))}
    first = model.step_paged(tokens=list(seqs.values()), starts=[0, 0], block_tables=list(tables.values()))
    for name, logits in zip(seqs, first, strict=True):
        seqs[name].append(logits.argmax().item())
    accepted = 0
    for step in range(24):
        rows = list(seqs)
        tokens = []
        for r, name in enumerate(rows):
            drafts = (step + r) % (K + 1)
            right = greedy(hf, seqs[name], drafts)
            good = (step // 2 + r) % (drafts + 1)  # drafts that are HF's greedy tokens, then wrong ones
            tokens.append([seqs[name][-1], *right[:good], *[(t + 1) % 400 for t in right[good:]]])
        starts = [len(seqs[name]) - 1 for name in rows]
        out = model.verify_paged(
            tokens=tokens,
            starts=starts,
            block_tables=[tables[name] for name in rows],
            sampling=torch.zeros(len(rows), K + 1, 4),
        )
        for r, name in enumerate(rows):
            with torch.no_grad():
                hf_logits = hf(torch.tensor([seqs[name][:-1] + tokens[r]])).logits[0, starts[r] :]
            picked = hf_logits.gather(1, out[r, : len(tokens[r]), None])[:, 0]
            assert (hf_logits.max(1).values - picked <= TOL).all(), (step, name)
            new = accepted_tokens(tokens[r][1:], out[r].tolist())
            accepted += len(new) - 1
            seqs[name] += new
    assert accepted >= 10
    assert {b.context for b in model.padding.real if b.kind == "verify"} == {32, 64, 256}


def test_verify_graphs_in_plan_and_their_count_at_2048_by_8(tiny_qwen2, capsys):
    args = ["--max-num-seqs", "8", "--max-model-len", "2048"]
    _, off = plan(tiny_qwen2, *args, capsys=capsys)
    lines, on = plan(tiny_qwen2, *args, "--num-speculative-tokens", "4", capsys=capsys)
    assert len(off) <= 24 and len(on) - len(off) <= 8, (len(off), len(on))
    assert {"verify[8x5x512+sample]", "verify[8x5x2048+sample]"} <= set(on)
    assert lines[-1] == f"{len(on)} graphs"


def test_a_folder_compiled_without_verify_graphs_is_refused(tiny_qwen2):
    shape = Qwen2Shape.from_pretrained(tiny_qwen2)
    plain = NeuronConfig(batch_size=4, seq_len=128).resolve(shape)
    with pytest.raises(
        ConfigError, match="num_speculative_tokens.* 3 was requested, but the graphs in f were co"
    ):
        check_compatible(plain, NeuronConfig(batch_size=4, seq_len=128, speculation_length=3), "f")
    wider = NeuronConfig(batch_size=4, seq_len=128, speculation_length=4).resolve(shape)
    assert check_compatible(wider, NeuronConfig(batch_size=4, seq_len=128, speculation_length=2)) == wider


def test_acceptance_rule():
    assert accepted_tokens([4, 5, 6], [4, 5, 6, 9]) == [4, 5, 6, 9]  # all accepted, then the bonus token
    assert accepted_tokens([4, 5, 6], [4, 8, 6, 9]) == [4, 8]  # the first mismatch replaces the draft
    assert accepted_tokens([], [3, 0, 0]) == [3]


def test_ngram_proposer_takes_the_longest_earliest_match():
    proposer = NgramProposer(num_drafts=3, min_n=1, max_n=3)
    sequences = [
        [1, 2, 3, 4, 5, 2, 3, 9, 1, 2, 3],  # [1, 2, 3] at 0 beats [2, 3] at 5: the longest match wins
        [7, 8, 9],  # no earlier occurrence
        [1, 2, 1, 2],  # room for one draft before max-model-len
        [5, 5, 6, 5, 5],  # [5, 5] at 0, the earliest occurrence
    ]
    assert proposer.propose(sequences, [100, 100, 1, 100]) == [[4, 5, 2], [], [1], [6, 5, 5]]
