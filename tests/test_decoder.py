"""The decoder against HF transformers' Qwen2ForCausalLM (the numerical oracle) on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from decoder_harness import CONFIG, CONTEXTS, load, play_chunked_session, play_context_session, play_session
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM, modeling
from vllm_neuron_qwen2.compile.buckets import Bucket
from vllm_neuron_qwen2.compile.costs import RankShape, core_memory
from vllm_neuron_qwen2.compile.cpu import can_prepack
from vllm_neuron_qwen2.config import ConfigError, Qwen2Shape
from vllm_neuron_qwen2.model.checkpoint import CheckpointError, load_checkpoint
from vllm_neuron_qwen2.model.graphs import BucketGraph, example_inputs
from vllm_neuron_qwen2.model.parallel import (
    PLAIN_GEMM_ROWS,
    GateUpLinear,
    ShardLinear,
    TPGroup,
    contiguous_shard,
    has_bf16_units,
)
from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder
from vllm_neuron_qwen2.model.sampling import allowed_tokens, bitmask_words

TOL = 2e-3
HERE = Path(__file__).parent

# name -> checkpoint geometry; together: tied and untied, GQA and MQA, heads and vocab not divisible by TP
GEOMETRIES = {
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "odd_heads_odd_vocab": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, vocab_size=501),
}


def hf_last_logits(hf: Qwen2ForCausalLM, seqs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])


def session_errors(model: NeuronQwen2ForCausalLM, model_dir: Path, session=play_session) -> list[float]:
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [
        (logits - hf_last_logits(hf, seqs)).abs().max().item()
        for seqs, logits in session(model, model.vocab_size)
    ]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_prefill_and_teacher_forced_decode_match_hf(make_checkpoint, geometry):
    model_dir = make_checkpoint(**GEOMETRIES[geometry])
    errors = session_errors(load(model_dir), model_dir)
    assert len(errors) >= 22  # 2 prefills + 20 decode steps
    assert max(errors) < TOL, errors


@pytest.mark.parametrize("geometry", ["gqa_tied", "odd_heads_odd_vocab"])
def test_chunked_prompts_mixed_with_decode_rows_match_hf(make_checkpoint, geometry):
    # chunks ending inside a block and on its edge, mid-prompt, one-token chunks, decode rows alongside
    model_dir = make_checkpoint(**GEOMETRIES[geometry])
    model = load(model_dir)
    errors = session_errors(model, model_dir, play_chunked_session)
    assert len(errors) == 8
    assert max(errors) < TOL, errors
    # one graph call a step, decode rows riding along (logits are asked for, so no decode graph runs)
    assert {b.kind for b in model.padding.real} == {"prefill"} and model.padding.graph_calls == 8


def test_shared_prefix_blocks_give_the_logits_of_a_cold_run(tiny_qwen2):
    # two sequences share a 3-block prefix (written once, by the first); the second writes only its own
    # blocks after them, and both decode on: each equals its own run on a fresh model
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 400, (24,), generator=gen).tolist()  # 3 blocks of 8
    tails = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (7, 12)]
    shared = load(tiny_qwen2)
    tables = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 9]]
    got = [shared.step_paged(tokens=[prefix + tails[0]], starts=[0], block_tables=[tables[0]])[0]]
    got.append(shared.step_paged(tokens=[tails[1]], starts=[24], block_tables=[tables[1]])[0])
    steps = [[5, 6], [7, 8], [9, 10]]
    lengths = [24 + len(t) for t in tails]
    for step in steps:
        logits = shared.step_paged(tokens=[[t] for t in step], starts=lengths, block_tables=tables)
        got += list(logits)
        lengths = [n + 1 for n in lengths]
    for row in (0, 1):
        cold = load(tiny_qwen2)
        want = [
            cold.step_paged(tokens=[prefix + tails[row]], starts=[0], block_tables=[[1, 2, 3, 4, 5, 6]])[0]
        ]
        for i, step in enumerate(steps):
            start = 24 + len(tails[row]) + i
            want.append(
                cold.step_paged(tokens=[[step[row]]], starts=[start], block_tables=[[1, 2, 3, 4, 5, 6]])[0]
            )
        mine = [got[row]] + got[2 + row :: 2]
        for a, b in zip(mine, want, strict=True):
            assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("in_graph_sampling", [True, False], ids=["decode_in_prefill", "decode_graphs"])
def test_context_buckets_change_mid_session_and_stay_exact(tiny_qwen2, in_graph_sampling):
    """Logits asked for: with in-graph sampling the decode steps run in the smallest prefill graph, without
    it in the decode graphs; both pick each step's context bucket."""
    model = load(tiny_qwen2, seq_len=256, context_lengths=[32, 64, 256], on_device_sampling=in_graph_sampling)
    errors = session_errors(model, tiny_qwen2, play_context_session)
    assert len(errors) == 44 and max(errors) < TOL, errors
    assert {b.context for b in model.padding.real} == {32, 64, 256}
    kinds = {b.kind for b in model.padding.real}
    assert kinds == ({"prefill"} if in_graph_sampling else {"prefill", "decode"})


@pytest.mark.parametrize("balance", [None, 10**6], ids=["cpu", "weights_dear"])
def test_rows_far_beyond_a_chunk_run_apart_when_that_costs_less(tiny_qwen2, monkeypatch, balance):
    """A 20-token chunk at the start of its sequence beside a row decoding at 200 (context buckets 32 / 64 /
    256): at the cpu backend's balance the row runs in a decode graph of its own, sampling there, and the
    chunk in the 32 prefill graph; where streaming the weights again costs more than the chunk's attention
    over 256 positions, the row rides along in the 256 one. Either way HF's logits and tokens, a grammar's
    bitmask kept."""
    if balance:
        monkeypatch.setitem(modeling.FLOPS_PER_BYTE, "cpu", balance)
    model = load(tiny_qwen2, **CONTEXTS)
    hf = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(9)
    seqs = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (201, 20)]
    tables = [list(range(1, 33)), list(range(33, 65))]
    model.step_paged(tokens=[seqs[0][:200]], starts=[0], block_tables=tables[:1])
    model.padding.real.clear()
    step = dict(tokens=[seqs[0][200:], seqs[1]], starts=[200, 0], block_tables=tables)
    want = hf_last_logits(hf, seqs)
    assert (model.step_paged(**step) - want).abs().max().item() < TOL
    allowed = want[0].topk(6).indices[2:].tolist()  # not the two best
    greedy = torch.tensor([[0.0, 0, 1, 0.5]] * 2)
    bitmask = bitmask_of([allowed, None], model.vocab_size)
    assert model.step_paged(**step, sampling=greedy, token_bitmask=bitmask).tolist() == [
        allowed[0],
        want[1].argmax().item(),
    ]
    prompt_contexts = {b.context for b, real in model.padding.real.items() if b.tokens and real}
    sampled_apart = any(b.kind == "decode" and b.sample for b in model.padding.real)
    assert (prompt_contexts, sampled_apart) == (({256}, False) if balance else ({32}, True))


def test_chunks_of_several_sequences_that_need_key_room_move_up_a_context(tiny_qwen2):
    """Contexts 32 / 64 / 256, blocks of 8: the 64 graphs (neither smallest nor largest) hold 1 + 8 key
    blocks, no room for a second sequence's. A 16-token chunk ending at 56 runs there alone; beside a new
    24-token prompt (7 + 3 blocks) the step moves to the 256 graph, which packs. HF's logits either way."""
    model = load(tiny_qwen2, **CONTEXTS)
    assert [b.key_blocks(8) for b in model.graphs if b.kind == "prefill" and b.context == 64] == [9, 9, 9]
    hf = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in (56, 24)]
    tables = [list(range(1, 33)), list(range(33, 65))]
    model.step_paged(tokens=[seqs[0][:40]], starts=[0], block_tables=tables[:1])
    for packed in (False, True):
        model.padding.real.clear()
        step = dict(tokens=[seqs[0][40:], seqs[1]][: 1 + packed], starts=[40, 0][: 1 + packed])
        got = model.step_paged(**step, block_tables=tables[: 1 + packed])
        assert (got - hf_last_logits(hf, seqs[: 1 + packed])).abs().max().item() < TOL
        assert [b.context for b in model.padding.real] == [256 if packed else 64]


def test_cpu_float32_layers_multiply_prompt_chunks_with_their_plain_weights(tiny_qwen2, monkeypatch):
    """Float32 on the cpu backend (eager or compiled): each layer's linear keeps its plain weight beside
    oneDNN's blocked one and uses it from PLAIN_GEMM_ROWS input rows (the default GEMM is faster there), the
    blocked one below; the lm_head keeps the blocked one only. The memory the pool is sized against counts the
    copy. A ladder whose graphs never feed a linear that many rows keeps no copy."""
    small = load(tiny_qwen2)  # 64-token steps
    assert all(m.weight is None for m in small.decoder.modules() if isinstance(m, ShardLinear))
    model = load(tiny_qwen2, seq_len=PLAIN_GEMM_ROWS)  # steps of up to PLAIN_GEMM_ROWS prompt tokens
    linears = [m for m in model.decoder.layers.modules() if isinstance(m, ShardLinear)]
    assert all(m.packed is not None and m.weight is not None for m in linears)
    assert model.decoder.lm_head.weight is None
    gate_up, plain_calls = model.decoder.layers[0].mlp.gate_up_proj, []
    default_linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda *a: plain_calls.append(a[0].shape[1]) or default_linear(*a)
    )
    with torch.no_grad():
        for rows in (PLAIN_GEMM_ROWS, PLAIN_GEMM_ROWS - 1, 8):
            gate_up(torch.randn(1, rows, gate_up.weight.shape[1]))
    assert plain_calls == [PLAIN_GEMM_ROWS]
    shape, config = model.decoder.shape, model.config
    weights = core_memory(shape, config, list(model.graphs)).weights
    copy = weights - core_memory(shape, small.config, list(small.graphs)).weights
    assert copy == RankShape.of(shape, config).layer_weights > 0


def mean_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean absolute error of `out` against a float64 reference."""
    return (out.double() - exact).abs().mean().item()


def test_bf16_prompt_chunks_attend_with_float32_queries(tiny_qwen2, monkeypatch):
    """A bfloat16 model's prompt chunks keep their queries' float32 precision in attention: on a CPU with
    bf16 units they multiply in bf16, q as two bf16 halves (else on float32 copies). With a sharp softmax,
    where rounding q to bf16 moves the result, they stay as close to exact attention as float32 copies."""
    decoder = load(tiny_qwen2, dtype="bfloat16").decoder
    g, d = torch.Generator().manual_seed(0), decoder.shape.head_dim
    q = 3 * torch.randn(1, 4, 64, d, generator=g)  # [1, Hq, T, D], float32 as RoPE leaves it
    k, v = (torch.randn(1, 2, 96, d, generator=g).bfloat16() for _ in range(2))
    mask = (torch.arange(96) <= torch.arange(64)[:, None] + 32)[None, None]
    exact = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=decoder.scale, enable_gqa=True
    )
    sdpa, input_dtypes = F.scaled_dot_product_attention, []
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda q, *a, **kw: input_dtypes.append(q.dtype) or sdpa(q, *a, **kw),
    )
    chunks = decoder._chunk_attention(q, k, v, mask)
    assert input_dtypes == [torch.bfloat16 if has_bf16_units() else torch.float32]
    rounded_queries = decoder._attention(q.bfloat16(), k, v, mask)
    float32_copies = decoder._attention(q, k, v, mask)
    assert chunks.dtype == torch.bfloat16
    chunks_error = mean_error(chunks, exact)
    assert chunks_error < 1.2 * mean_error(float32_copies, exact)
    assert chunks_error < 0.7 * mean_error(rounded_queries, exact)


def test_bf16_gate_up_applies_swiglu_in_onednn_epilogues():
    """Prepacked in bfloat16 (cpu backend), gate_up_proj keeps gate and up blocked apart and has oneDNN apply
    silu and the product in the GEMMs' float32 epilogues: fewer roundings than the generic path's."""
    if not can_prepack("bfloat16"):
        pytest.skip("oneDNN blocks bfloat16 weights only on CPUs with AVX-512")
    g, rows = torch.Generator().manual_seed(0), contiguous_shard(128, TPGroup())
    layer = GateUpLinear(64, (rows, rows), bias=False, dtype=torch.bfloat16)
    layer.weight.data = (torch.randn(256, 64, generator=g) / 8).bfloat16()
    x = torch.randn(1, 40, 64, generator=g).bfloat16()
    gate, up = (x.double() @ w.double().T for w in layer.weight.chunk(2))
    exact = F.silu(gate) * up
    generic = layer(x)
    layer.prepack(8, keep_plain=False)
    assert layer.weight is None and [h.dtype for h in layer.halves] == [torch.bfloat16] * 2
    fused = layer(x)
    assert fused.shape == generic.shape == (1, 40, 128) and fused.dtype == torch.bfloat16
    assert mean_error(fused, exact) < mean_error(generic, exact)


def test_prompt_longer_than_the_largest_prefill_bucket_runs_in_several_calls(tiny_qwen2):
    model = load(tiny_qwen2, max_num_batched_tokens=16, batch_size=2)  # prefill buckets up to 16
    hf = Qwen2ForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    prompt = torch.randint(0, 400, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = model.prefill([prompt], [1])
    assert (logits - hf_last_logits(hf, [prompt])).abs().max().item() < TOL
    assert sum(model.padding.real.values()) == 60 and max(b.tokens for b in model.padding.real) == 16


@pytest.mark.parametrize("dtype,num_shards", [("bfloat16", 2), ("float16", 1)])
def test_half_precision_and_sharded_checkpoints_match_hf(make_checkpoint, dtype, num_shards):
    model_dir = make_checkpoint(dtype=dtype, num_shards=num_shards)
    assert (model_dir / "model.safetensors.index.json").exists() == (num_shards > 1)
    assert max(session_errors(load(model_dir), model_dir)) < TOL


def run_tp(model_dir: Path, tp: int, tmp_path: Path) -> list[dict]:
    """Play the harness session under torchrun on `tp` ranks; returns each rank's logits and bytes read."""
    out = tmp_path / f"tp{tp}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp)]
    cmd += ["--standalone", str(HERE / "decoder_harness.py"), str(model_dir), str(out)]
    subprocess.run(cmd, check=True, env=env, timeout=600)
    return [torch.load(out.with_suffix(f".rank{r}.pt")) for r in range(tp)]


@pytest.mark.parametrize(
    "geometry,tp",
    [("gqa_tied", 2), ("mqa", 2), ("odd_heads_odd_vocab", 4)],  # MQA at TP 2 replicates the KV head
)
def test_tensor_parallel_equals_single_rank(make_checkpoint, tmp_path, geometry, tp):
    model_dir = make_checkpoint(**GEOMETRIES[geometry])
    model = load(model_dir)
    single = [lg for _, lg in play_session(model, model.vocab_size)]
    single += [lg for _, lg in play_chunked_session(model, model.vocab_size)]
    checkpoint_bytes = (model_dir / "model.safetensors").stat().st_size
    for rank in run_tp(model_dir, tp, tmp_path):
        for a, b in zip(rank["logits"], single, strict=True):
            assert (a - b).abs().max().item() < TOL
        # each rank reads about its shard only (norms and replicated KV heads are read by every rank)
        assert rank["bytes_read"] < 1.3 * checkpoint_bytes / tp


def slot_cache(model: NeuronQwen2ForCausalLM, slot: int) -> list[torch.Tensor]:
    """Copies of every layer's K and V entries of one slot's blocks."""
    cache, bs = model.decoder.kv_cache, model.config.block_size
    rows = torch.tensor([b * bs + i for b in model.slot_blocks(slot) for i in range(bs)])
    return [t[rows].clone() for i in range(len(model.decoder.layers)) for t in cache.layer(i)]


def test_decode_over_subset_leaves_other_slots_unchanged(tiny_qwen2):
    model = load(tiny_qwen2)
    model.prefill([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [0, 1, 2])
    before = {s: slot_cache(model, s) for s in (0, 1, 2)}
    model.decode([20, 21], [4, 3], [2, 0])  # slot 1 is not in this step; padded rows must not touch it
    for slot, changed in ((1, False), (2, True), (0, True)):
        same = all(torch.equal(b, a) for b, a in zip(before[slot], slot_cache(model, slot), strict=True))
        assert same != changed


def test_buckets_smallest_fitting_and_clear_errors(tiny_qwen2):
    model = load(tiny_qwen2)
    assert model.config.prefill_lengths == [8, 16, 32, 64]  # up to the 64-token step budget
    # 45 prompt tokens, packed end to end; their 7 key blocks (and the padding block) fit the context's 8 + 1,
    # so the graph without key room takes them
    model.prefill([[1] * 16, [2] * 17, [3] * 12], [0, 1, 2])
    unpacked = Bucket(4, 64, 64, False, packs=False)
    assert dict(model.padding.real) == {unpacked: 45} and model.padding.padded[unpacked] == 19
    model.prefill([[1] * 20, [2] * 20, [3] * 20], [0, 1, 2])  # 9 key blocks: the packed one
    assert model.padding.real[Bucket(4, 64, 64, False)] == 60
    model.decode([1, 2], [16, 31], [0, 1], sampling=torch.zeros(2, 4))
    assert Bucket(2, 0, 64, True) in model.padding.real
    with pytest.raises(ValueError, match=r"positions 0..64 must lie in \[0, seq_len=64\)"):
        model.prefill([[1] * 65], [0])
    with pytest.raises(ValueError, match="seq_len=64"):
        model.decode([1], [64], [0])
    with pytest.raises(ValueError, match="seq_ids must be distinct slots"):
        model.decode([1], [3], [4])
    with pytest.raises(ValueError, match="vocab_size"):
        model.decode([model.vocab_size], [3], [0])
    with pytest.raises(ValueError, match="needs 2 blocks of 8, its block table has 1"):
        model.step_paged(tokens=[[1] * 9], starts=[0], block_tables=[[1]])
    with pytest.raises(ValueError, match=r"block ids must lie in \[1, num_blocks=33\)"):
        model.step_paged(tokens=[[1]], starts=[0], block_tables=[[0]])


def test_step_packs_prompts_and_carries_decode_rows(tiny_qwen2):
    # decode rows riding in a packed prefill call give what separate decode and prefill calls give
    separate, mixed = load(tiny_qwen2), load(tiny_qwen2)
    for model in (separate, mixed):
        model.prefill([[5, 6, 7, 8], [9, 10]], [0, 1])
    prompts = [[11] * 40, [12, 13, 14] * 7]  # 40 + 21 tokens: one 64-token call
    want = torch.cat([separate.decode([20, 21], [4, 2], [0, 1]), separate.prefill(prompts, [2, 3])])
    got = mixed.step(
        input_ids=[20, 21], position_ids=[4, 2], seq_ids=[0, 1], prompts=prompts, prompt_seq_ids=[2, 3]
    )
    assert (got - want).abs().max().item() < 1e-4
    assert mixed.padding.real[Bucket(4, 64, 64, False, packs=False)] == 61  # 8 key blocks: no room needed
    assert not any(b.kind == "decode" for b in mixed.padding.real), "the decode rows rode along"
    # and the caches agree: one more decode step over all four slots
    step = ([22, 23, 24, 25], [5, 3, 40, 30], [0, 1, 2, 3])
    assert (mixed.decode(*step) - separate.decode(*step)).abs().max().item() < 1e-4


def test_in_graph_sampling_greedy_matches_argmax_and_respects_top_k(tiny_qwen2):
    model = load(tiny_qwen2)
    prompts = [[5, 6, 7], [8, 9]]
    logits = model.prefill(prompts, [0, 1])
    greedy = torch.tensor([[0.0, 0, 1, 0.5], [0.0, 0, 1, 0.5]])
    assert model.prefill(prompts, [0, 1], sampling=greedy).tolist() == logits.argmax(-1).tolist()
    top2 = set(logits[0].topk(2).indices.tolist())
    for u in torch.linspace(0, 0.999, 7).tolist():
        params = torch.tensor([[1.5, 2, 1.0, u], [0.0, 0, 1.0, u]])
        token = model.prefill(prompts, [0, 1], sampling=params)
        assert token[0].item() in top2 and token[1].item() == logits[1].argmax().item()


def bitmask_of(allowed: list[list[int] | None], vocab: int) -> torch.Tensor:
    """[rows, words] int32 in vLLM's grammar bitmask layout; None: every token."""
    bitmask = torch.zeros(len(allowed), bitmask_words(vocab), dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        if tokens is None:
            bitmask[row] = -1
        for t in tokens or ():
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    return bitmask


def test_token_bitmasks_are_read_as_xgrammar_writes_them():
    # vLLM's grammar bitmasks come from xgrammar (or are laid out as its): a bit per token, low bit first
    import xgrammar

    gen = torch.Generator().manual_seed(0)
    for vocab in (70, 96):
        bitmask = torch.randint(
            -(2**31), 2**31 - 1, (3, bitmask_words(vocab)), dtype=torch.int32, generator=gen
        )
        logits = torch.zeros(3, vocab)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask)
        assert torch.equal(allowed_tokens(bitmask, vocab), logits == 0)
    assert torch.equal(
        allowed_tokens(bitmask_of([[0, 33, 69], None], 70), 70).nonzero()[:3, 1], torch.tensor([0, 33, 69])
    )


def test_sampling_keeps_to_the_token_bitmask_in_prefill_and_decode_graphs(tiny_qwen2):
    # a row may sample only the tokens its bitmask allows (a grammar's): greedy takes the best of them,
    # temperature draws among them; on the host after a prefill step and inside the decode graph
    model = load(tiny_qwen2)
    vocab = model.vocab_size
    tables = [model.slot_blocks(0), model.slot_blocks(1)]
    prompts = [[5, 6, 7], [8, 9]]
    for tokens, starts in ((prompts, [0, 0]), ([[11], [12]], [3, 2])):
        logits = model.step_paged(tokens=tokens, starts=starts, block_tables=tables)
        allowed = logits[0].topk(6).indices[2:].tolist()  # not the two best
        bitmask = bitmask_of([allowed, None], vocab)
        for u in torch.linspace(0, 0.999, 5).tolist():
            params = torch.tensor([[1.0, 0, 1.0, u], [0.0, 0, 1.0, u]])
            for greedy in (True, False):
                params[0, 0] = 0.0 if greedy else 1.0
                got = model.step_paged(
                    tokens=tokens, starts=starts, block_tables=tables, sampling=params, token_bitmask=bitmask
                ).tolist()
                assert got[0] == allowed[0] if greedy else got[0] in allowed
                assert got[1] == logits[1].argmax().item()
    assert any(b.kind == "decode" and b.sample for b in model.padding.real), "the decode graph sampled"


def test_strict_export_of_a_prefill_a_decode_and_a_score_bucket(tiny_qwen2):
    # the backend-neutral graphs, as a Neuron tracer gets them (the cpu backend prepacks weights for oneDNN)
    config = NeuronConfig(**CONFIG).resolve(Qwen2Shape.from_pretrained(tiny_qwen2))
    decoder = Qwen2Decoder(Qwen2Shape.from_pretrained(tiny_qwen2), config, TPGroup())
    load_checkpoint(decoder, tiny_qwen2, progress=False)
    for bucket in (
        Bucket(config.batch_size, 32, 64, False),
        Bucket(4, 0, 64, True),
        Bucket(0, 32, 64, False, True),
    ):
        graph = BucketGraph(decoder, bucket)
        inputs = example_inputs(bucket, config.block_size, decoder.shape.vocab_size)
        exported = torch.export.export(graph, inputs, strict=True)
        assert exported.graph_module is not None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=0), "batch_size: must be >= 1"),
        (dict(tp_degree=5), "tp_degree: 5 exceeds num_attention_heads=4"),
        (dict(prefill_lengths=[16, 128]), "prefill_lengths: the largest bucket must be .*=64, got 128"),
        (dict(prefill_lengths=[12, 64]), "prefill_lengths: must be positive multiples of 8"),
        (dict(context_lengths=[100]), "context_lengths: must be positive multiples of 8"),
        (dict(context_lengths=[32]), "context_lengths: the largest bucket must be seq_len .*=64, got 32"),
        (dict(block_size=12), r"block_size: 12 is not one of \(8, 16"),
        (dict(num_blocks=8), "num_blocks: 8 blocks of 8 tokens cannot hold one sequence of seq_len=64"),
        (dict(seq_len=4096), "seq_len: 4096 exceeds max_position_embeddings"),
        (dict(backend="gpu"), "backend: 'gpu' is not one of"),
        (dict(dtype="int8"), "dtype: 'int8' is not one of"),
    ],
)
def test_config_errors_name_the_field(tiny_qwen2, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(tiny_qwen2, **overrides)


def test_unknown_neuron_config_field_is_rejected():
    with pytest.raises(ConfigError, match="unknown neuron_config field.*'batchsize'"):
        NeuronConfig.from_dict({"batchsize": 4})


def test_neuron_config_round_trips_through_json(tmp_path, tiny_qwen2):
    model = load(tiny_qwen2)
    model.config.save(tmp_path)
    assert NeuronConfig.load(tmp_path) == model.config


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not implemented"),
    ],
)
def test_unsupported_model_configs_fail_at_load(make_checkpoint, tmp_path, change, message):
    model_dir = copy_checkpoint(make_checkpoint(), tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ConfigError, match=message):
        load(model_dir)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda sd: sd.pop("model.layers.1.self_attn.k_proj.bias"),
            "missing tensor 'model.layers.1.self_attn.k_proj.bias'",
        ),
        (lambda sd: sd.update(extra=torch.zeros(2)), r"unexpected tensor\(s\) \['extra'\]"),
        (
            lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(7, 64)}),
            r"'model.layers.0.mlp.up_proj.weight' has shape \[7, 64\]",
        ),
    ],
)
def test_checkpoint_errors_name_the_tensor(tiny_qwen2, tmp_path, edit, message):
    model_dir = copy_checkpoint(tiny_qwen2, tmp_path)
    state = load_file(model_dir / "model.safetensors")
    edit(state)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load(model_dir)
