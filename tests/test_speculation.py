"""Speculative decoding: verify graphs against HF transformers, the n-gram proposer, the acceptance rule."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from decoder_harness import CONTEXTS, load
from test_compile import plan
from test_decoder import bitmask_of
from transformers import Qwen2ForCausalLM

from vllm_neuron_qwen2.compile.artifacts import check_compatible
from vllm_neuron_qwen2.config import ConfigError, NeuronConfig, Qwen2Shape
from vllm_neuron_qwen2.model.sampling import TEMPERATURE, TOP_P, UNIFORM, bitmask_words, sample
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


def test_verify_graph_samples_each_position_within_its_token_bitmask(tiny_qwen2):
    # a grammar row's bitmask at each row token (vLLM's layout: the grammar state after the drafts before
    # it): forbidding the draft the graph would otherwise sample rejects it, and the token sampled there
    # is HF's best among the allowed ones
    hf = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    model = load(tiny_qwen2, **CONTEXTS, speculation_length=K)
    seq = [5, 6, 7, 8, 9]
    seq.append(
        model.step_paged(tokens=[seq], starts=[0], block_tables=[list(range(1, 33))])[0].argmax().item()
    )
    row = [seq[-1], *greedy(hf, seq, K)]  # drafts HF itself would take
    with torch.no_grad():
        hf_logits = hf(torch.tensor([seq[:-1] + row])).logits[0, len(seq) - 1 :]
    forbidden = 1  # the second draft is refused at its position
    allowed = hf_logits[forbidden].topk(8).indices[1:].tolist()
    bitmask = torch.full((1, K + 1, bitmask_words(model.vocab_size)), -1, dtype=torch.int32)
    bitmask[0, forbidden] = bitmask_of([allowed], model.vocab_size)[0]
    out = model.verify_paged(
        tokens=[row],
        starts=[len(seq) - 1],
        block_tables=[list(range(1, 33))],
        sampling=torch.zeros(1, K + 1, 4),
        token_bitmask=bitmask,
    )[0].tolist()
    assert out[:forbidden] == row[1 : 1 + forbidden] and out[forbidden] == allowed[0] != row[1 + forbidden]
    assert accepted_tokens(row[1:], out) == [*row[1 : 1 + forbidden], allowed[0]]


def test_prompt_chunks_ride_along_with_drafts(make_checkpoint):
    # A row with drafts beside the chunks of a long prompt: each chunk rides in the verify graph with the
    # fewest prompt tokens that holds it (64, or a quarter: 16 here), the drafts checked and the token after
    # the chunk sampled as HF's argmax. Only chunks whose key blocks fit no one call leave the drafts
    # unchecked (None: step without them).
    model_dir = make_checkpoint(num_attention_heads=4, num_key_value_heads=2)
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load(model_dir, **CONTEXTS, speculation_length=K, max_num_batched_tokens=64)
    gen = torch.Generator().manual_seed(3)
    seq, prompt = torch.randint(0, 400, (20,), generator=gen).tolist(), torch.randint(0, 400, (160,)).tolist()
    tables = [list(range(1, 33)), list(range(33, 65))]
    seq.append(model.step_paged(tokens=[seq], starts=[0], block_tables=tables[:1])[0].argmax().item())
    at = 0
    for chunk in (56, 64, 12):
        right = greedy(hf, seq, K)
        row = [seq[-1], *right[:2], (right[2] + 1) % 400]  # two right drafts, then a wrong one
        step = {"tokens": [row, prompt[at : at + chunk]], "starts": [len(seq) - 1, at]}
        step["block_tables"] = tables
        assert model.verify_fits(**step, chunks=[1])
        out = model.verify_paged(**step, sampling=torch.zeros(2, K + 1, 4), chunks=[1])
        assert out[0].tolist()[:3] == right, chunk
        assert out[1, 0] == greedy(hf, prompt[: at + chunk], 1)[0]
        seq += accepted_tokens(row[1:], out[0].tolist())
        at += chunk
    ridden = {(b.tokens, b.context) for b in model.padding.real if b.kind == "verify"}
    assert ridden == {(64, 64), (64, 256), (16, 256)}
    # two sequences' chunks at 132 and 180 attend 1 + 18 + 24 key blocks; a verify call holds 41 at most
    row = [seq[-1], *greedy(hf, seq, K)]
    apart = {
        "tokens": [row, prompt[at : at + 8], [5] * 10],
        "starts": [len(seq) - 1, at, 180],
        "block_tables": [*tables, list(range(65, 97))],
    }
    assert not model.verify_fits(**apart, chunks=[1, 2])
    assert model.verify_paged(**apart, sampling=torch.zeros(3, K + 1, 4), chunks=[1, 2]) is None


def test_verify_graphs_in_plan_and_their_count_at_2048_by_8(tiny_qwen2, capsys):
    args = ["--max-num-seqs", "8", "--max-model-len", "2048"]
    _, off = plan(tiny_qwen2, *args, capsys=capsys)
    lines, on = plan(tiny_qwen2, *args, "--num-speculative-tokens", "4", capsys=capsys)
    assert len(off) <= 24 and len(on) - len(off) <= 8, (len(off), len(on))
    verify = {g for g in on if g.startswith("verify")}
    assert verify == {
        f"verify[{shape}x{context}+sample]"
        for context in (512, 2048)
        for shape in ("1x5", "8x5", "8x5+128", "8x5+512")
    }
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


# vLLM's greedy rejection-sampler cases (tests/v1/sample/test_rejection_sampler.py): drafts, the target's
# argmax after each row token (the last one is the bonus token), and what the row outputs
VLLM_GREEDY_CASES = [
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),  # perfect match, then the bonus token
    ([1, 2, 3], [1, 5, 3, 4], [1, 5]),  # early mismatch
    ([1, 2], [1, 2, 5], [1, 2, 5]),
    ([3], [3, 4], [3, 4]),
    ([1], [1, 2], [1, 2]),  # single draft
    ([], [5], [5]),  # no drafts: the sampled token only
    ([1, 2, 3], [1, 2, 7, 6], [1, 2, 7]),  # multiple mismatches
    ([4, 5, 6], [4, 8, 6, 9], [4, 8]),
    ([1], [2, 3], [2]),  # first mismatch
    ([1, 2], [1, 5, 6], [1, 5]),
    ([3, 4], [3, 4, 7], [3, 4, 7]),
]


@pytest.mark.parametrize(("drafts", "argmax", "expected"), VLLM_GREEDY_CASES)
def test_acceptance_rule_on_vllm_greedy_cases(drafts, argmax, expected):
    assert accepted_tokens(drafts, argmax) == expected


def vllm_rejection_sample():
    """vLLM's own `rejection_sample`, on this CPU: vLLM 0.32 registers C++ kernels for its Triton ones;
    vLLM 0.16 has Triton (GPU) kernels only."""
    from vllm.platforms.cpu import CpuPlatform

    if not hasattr(CpuPlatform, "register_triton_kernel_overrides"):
        pytest.skip("this vLLM's rejection sampler has no CPU kernels (vLLM 0.16: Triton only)")
    CpuPlatform.register_triton_kernel_overrides()
    from vllm.v1.sample.rejection_sampler import rejection_sample

    return rejection_sample


def test_sampled_acceptance_is_distributed_as_vllm_rejection_sampler():
    # A row of 3 n-gram (one-hot) drafts, temperature 1, fixed target logits at its 4 tokens. vLLM's
    # RejectionSampler (its CPU kernels) and this plugin's rule (the in-graph sampler at every row token, then
    # accepted_tokens) each give 6000 rows' outputs; their joint frequencies match (chi-square, p > 0.01).
    # The drafts are likely, unlikely, then likely, so every output length occurs.
    from types import SimpleNamespace

    from test_vllm_speculation import chi_square_p

    rejection_sample = vllm_rejection_sample()
    torch.manual_seed(0)
    vocab, n = 6, 6000
    logits = torch.randn(K + 1, vocab)
    drafts = [logits[0].argmax().item(), logits[1].argmin().item(), logits[2].argmax().item()]
    probs = logits.softmax(-1)
    metadata = SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.ones(n), generators={})
    out = rejection_sample(
        torch.tensor(drafts * n),  # n rows of the same drafts, in one call
        [K] * n,
        K,
        torch.arange(1, n + 1) * K,
        None,
        logits[:K].repeat(n, 1),
        torch.multinomial(probs[K], n, replacement=True)[:, None],  # vLLM's sampler draws the bonus token
        metadata,
    )
    theirs = Counter(tuple(t for t in row if t >= 0) for row in out.tolist())
    params = torch.zeros(n * (K + 1), 4)
    params[:, TEMPERATURE], params[:, TOP_P], params[:, UNIFORM] = 1.0, 1.0, torch.rand(n * (K + 1))
    sampled = sample(logits.repeat(n, 1), params, vocab).view(n, K + 1).tolist()
    ours = Counter(tuple(accepted_tokens(drafts, row)) for row in sampled)
    assert {len(t) for t in ours} == {1, 2, 3, 4}
    assert chi_square_p(ours, theirs) > 0.01
    # and the test can tell: accepting every draft is not distributed as vLLM's rule
    bonus = torch.multinomial(probs[K], n, replacement=True).tolist()
    always = Counter((*drafts, b) for b in bonus)
    assert chi_square_p(always, theirs) < 1e-6


def test_ngram_proposer_takes_the_longest_earliest_match():
    proposer = NgramProposer(num_drafts=3, min_n=1, max_n=3)
    sequences = [
        [1, 2, 3, 4, 5, 2, 3, 9, 1, 2, 3],  # [1, 2, 3] at 0 beats [2, 3] at 5: the longest match wins
        [7, 8, 9],  # no earlier occurrence
        [1, 2, 1, 2],  # room for one draft before max-model-len
        [5, 5, 6, 5, 5],  # [5, 5] at 0, the earliest occurrence
    ]
    assert proposer.propose(sequences, [100, 100, 1, 100]) == [[4, 5, 2], [], [1], [6, 5, 5]]


def test_row_masks_and_penalties_after_each_draft_are_vllms():
    # A row's allowed_token_ids, bad_words, min_tokens and repetition and presence penalties, after its output
    # and each prefix of its drafts, against vLLM's own bad-words and penalty functions (its rejection
    # sampler counts the drafts before a position as output) and its min_tokens rule.
    from vllm.model_executor.layers.utils import apply_penalties
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.ops.bad_words import apply_bad_words_with_drafts

    from vllm_neuron_qwen2.model.sampling import Penalties, penalize
    from vllm_neuron_qwen2.runner import _Request

    vocab, prompt, output, drafts = 70, [3, 4, 5], [6, 7], [8, 9, 6]
    params = SamplingParams(
        repetition_penalty=1.3,
        frequency_penalty=0.25,
        presence_penalty=0.4,
        min_tokens=4,
        stop_token_ids=[9, 11],
        allowed_token_ids=list(range(2, 60)),
    )
    params._bad_words_token_ids = [[12], [7, 8], [9, 6, 13], [6, 7, 8, 14]]  # as the tokenizer sets them
    req = _Request("r", prompt, params, None, [1], output)
    pasts = [output + drafts[:j] for j in range(len(drafts) + 1)]
    theirs = torch.zeros(len(pasts), vocab)
    apply_bad_words_with_drafts(theirs, {0: params.bad_words_token_ids}, pasts, [len(pasts)])
    theirs[:, :2] = theirs[:, 60:] = -torch.inf  # allowed_token_ids
    theirs[: 4 - len(output), [9, 11]] = -torch.inf  # min_tokens: stop tokens while the output is short
    masks = torch.stack([req.allowed_tokens(drafts[:j], vocab) for j in range(len(pasts))])
    assert torch.equal(masks, theirs == 0)
    assert not masks[0, 8] and not masks[1, 14] and masks[2, 14] and not masks[3, 13]  # the case can tell

    logits = torch.randn(len(pasts), vocab)
    prompt_ids = torch.tensor([prompt] * len(pasts))
    output_ids = torch.tensor([p + [vocab] * (len(pasts[-1]) - len(p)) for p in pasts])  # padded as vLLM
    rows = req.penalties_after_each(drafts)
    assert rows[3].repeated.tolist() == [3, 4, 5, 6, 7, 8, 9] and rows[3].output_counts == {
        6: 2,
        7: 1,
        8: 1,
        9: 1,
    }
    repetition, frequency, presence = torch.tensor([rows[0].factors] * len(pasts)).T
    expected = apply_penalties(logits.clone(), prompt_ids, output_ids, presence, frequency, repetition)
    assert torch.equal(penalize(logits, Penalties.listed(rows)), expected)
    # before any output the second list is empty and changes nothing (token 0, where its padding points,
    # included); a row without penalties is left alone
    (fresh,) = _Request("s", prompt, params, None, [1]).penalties_after_each([])
    assert fresh.output_counts == {}
    no_output = torch.full((2, 1), vocab)
    expected = apply_penalties(
        logits[:2].clone(), prompt_ids[:2], no_output, presence[:2], frequency[:2], repetition[:2]
    )
    expected[1] = logits[1]
    assert torch.equal(penalize(logits[:2], Penalties.listed([fresh, None])), expected)
