"""vLLM's offline `LLM(...)` on the vllm-neuron-qwen2 platform (cpu backend) against HF transformers.

One LLM per configuration (module-scoped), engine in-process. Prompts are token ids, so lengths sit exactly
on bucket edges; HF's Qwen2ForCausalLM, teacher-forced on each generated sequence, is the oracle.
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from bf16_errors import (
    CHECKPOINTS,
    PROMPTS,
    RUNS,
    assert_within_vllm_cpu,
    sequences,
    token_errors,
    vllm_prompt_scores,
)
from structured_schemas import SCHEMA

TOL = 2e-3
MAX_MODEL_LEN = 128
SLOTS = 4
ENV = {
    "VLLM_NEURON_QWEN2_BACKEND": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: faster start, one process to clean
}

# name -> (checkpoint geometry, LLM kwargs). Together: in-graph and host sampling, async scheduling on and
# off, default and hand-picked buckets and block sizes, prompts chunked over several steps, prefix caching
# and chunked prefill on (vLLM's default) and off, tied and untied embeddings, a vocab padded beyond the
# tokenizer.
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "in_graph_sampling_async": ({}, {"async_scheduling": True}),
    "host_sampling_sync_custom_buckets_chunks_of_40": (
        {"tie_word_embeddings": False},
        {
            "async_scheduling": False,
            "block_size": 16,
            "max_num_batched_tokens": 40,
            "additional_config": {
                "neuron_config": {
                    "on_device_sampling": False,
                    "prefill_lengths": [16, 40],
                    "decode_batch_sizes": [2, 4],
                    "context_lengths": [48, 128],
                }
            },
        },
    ),
    "padded_vocab": ({"vocab_size": 512, "num_key_value_heads": 1}, {"max_logprobs": -1}),
    "prefix_caching_and_chunked_prefill_off": (
        {},
        {"enable_prefix_caching": False, "enable_chunked_prefill": False},
    ),
}


def sampling(**kwargs: Any) -> Any:
    from vllm import SamplingParams  # imported late: vLLM picks its platform on first use

    return SamplingParams(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def plugin_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)
        from vllm.platforms import current_platform

        assert type(current_platform).__name__ == "NeuronQwen2Platform", (
            "vLLM resolved its platform before VLLM_NEURON_QWEN2_BACKEND=cpu was set; run these tests alone"
        )
        yield


def make_llm(model_dir: Path, **kwargs: Any) -> Any:
    from vllm import LLM

    args = {
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": SLOTS,
        "enforce_eager": True,
        "disable_log_stats": False,  # prefix-cache and preemption counters in get_metrics()
        **kwargs,
    }
    return LLM(model=str(model_dir), **args)


def shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module", params=list(CONFIGS))
def configured(
    request: pytest.FixtureRequest, make_checkpoint: Callable[..., Path]
) -> Iterator[tuple[Any, Path]]:
    geometry, llm_kwargs = CONFIGS[request.param]
    model_dir = make_checkpoint(**geometry)
    llm = make_llm(model_dir, **llm_kwargs)
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling == llm_kwargs.get(
        "async_scheduling", True
    )
    yield llm, model_dir
    shutdown(llm)


@pytest.fixture(scope="module")
def default_llm(make_checkpoint: Callable[..., Path]) -> Iterator[tuple[Any, Path]]:
    model_dir = make_checkpoint()
    llm = make_llm(model_dir)
    yield llm, model_dir
    shutdown(llm)


_HF: dict[Path, Any] = {}


def hf_model(model_dir: Path) -> Any:
    from transformers import Qwen2ForCausalLM

    if model_dir not in _HF:
        _HF[model_dir] = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF[model_dir]


def hf_logits(model_dir: Path, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len(output), vocab] for each generated position."""
    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([prompt + output[:-1]])).logits[0]
    return logits[len(prompt) - 1 :].float()


def token_prompts(n: int, lengths: list[int], vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(vocab) for _ in range(lengths[i % len(lengths)])]}
        for i in range(n)
    ]


def generate(llm: Any, prompts: list[Any], params: Any) -> list[Any]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0] for o in outputs]


def tokenizer_vocab(llm: Any) -> int:
    return len(llm.get_tokenizer())


# Prompt lengths around block edges (16, 32) and tiles of 8, longer than a 40-token step, plus one that runs
# into max_model_len.
EDGE_LENGTHS = [1, 7, 8, 9, 15, 16, 17, 24, 25, 31, 32, 33, 47, 64, 65, 95, 96, 120]
MAX_TOKENS = [1, 3, 30, 12, 5, 40, 2, 17]


def test_greedy_tokens_and_logprobs_match_hf(configured: tuple[Any, Path]) -> None:
    llm, model_dir = configured
    prompts = token_prompts(len(EDGE_LENGTHS), EDGE_LENGTHS, tokenizer_vocab(llm))
    # Half the rows ask for logprobs (host sampling), half do not (in-graph where enabled): mixed calls.
    params = [
        sampling(
            temperature=0.0,
            max_tokens=MAX_TOKENS[i % len(MAX_TOKENS)],
            ignore_eos=True,
            logprobs=3 if i % 2 else None,
        )
        for i in range(len(prompts))
    ]
    outputs = generate(llm, prompts, params)
    assert len(outputs) == len(prompts) > 4 * SLOTS - 1
    for prompt, param, out in zip(prompts, params, outputs, strict=True):
        ids = prompt["prompt_token_ids"]
        expected_len = min(param.max_tokens, MAX_MODEL_LEN - len(ids))
        assert len(out.token_ids) == expected_len
        logprobs = hf_logits(model_dir, ids, list(out.token_ids)).log_softmax(-1)
        assert out.token_ids == logprobs.argmax(-1).tolist()
        if param.logprobs is None:
            assert out.logprobs is None
            continue
        for step, (token, entries) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            top = logprobs[step].topk(3).indices.tolist()
            assert set(top) <= set(entries) and token in entries
            for tok, entry in entries.items():
                assert abs(entry.logprob - logprobs[step, tok].item()) < TOL
            assert entries[token].rank == 1


def test_tensor_parallel_2_matches_tp_1(default_llm: tuple[Any, Path]) -> None:
    llm, model_dir = default_llm
    prompts = token_prompts(10, [5, 17, 33, 70], tokenizer_vocab(llm), seed=1)
    params = sampling(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = [o.token_ids for o in generate(llm, prompts, params)]
    from vllm import envs

    # The in-process engine above froze vLLM's env cache; let the platform's spawn default reach the executor.
    envs.disable_envs_cache()
    tp2 = make_llm(model_dir, tensor_parallel_size=2)
    try:
        assert tp2.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "mp"
        assert [o.token_ids for o in generate(tp2, prompts, params)] == expected
    finally:
        shutdown(tp2)


@pytest.mark.parametrize(("name", "tp"), RUNS)
def test_bf16_stays_within_vllm_cpu_errors(make_checkpoint: Callable[..., Path], name: str, tp: int) -> None:
    """--dtype bfloat16 against HF float32 on HF's greedy continuation (prompt logprobs), bounded by vLLM's
    own CPU backend in bf16 on the same tokens (see bf16_errors.py)."""
    from vllm import envs

    envs.disable_envs_cache()  # as in the TP 2 test: the spawn default must reach the executor
    model_dir = make_checkpoint(**CHECKPOINTS[name])
    llm = make_llm(model_dir, dtype="bfloat16", tensor_parallel_size=tp, max_num_seqs=len(PROMPTS))
    try:
        forced = [{"prompt_token_ids": s} for s in sequences(model_dir)]
        outputs = llm.generate(forced, sampling(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        assert_within_vllm_cpu(name, tp, token_errors(model_dir, vllm_prompt_scores(outputs)))
    finally:
        shutdown(llm)


def test_dtype_auto_keeps_a_bf16_checkpoint_in_bf16(make_checkpoint: Callable[..., Path]) -> None:
    llm = make_llm(make_checkpoint(dtype="bfloat16"))  # float32 checkpoints stay float32: every other test
    try:
        assert llm.llm_engine.vllm_config.model_config.dtype == torch.bfloat16
        assert (
            len(
                generate(llm, [{"prompt_token_ids": [1, 2, 3]}], sampling(max_tokens=3, ignore_eos=True))[
                    0
                ].token_ids
            )
            == 3
        )
    finally:
        shutdown(llm)


def test_seed_reproducible_across_batches_and_paths(default_llm: tuple[Any, Path]) -> None:
    llm, _ = default_llm
    prompts = token_prompts(6, [4, 20, 40], tokenizer_vocab(llm), seed=2)
    for extra in ({"top_k": 50, "top_p": 0.9}, {"min_p": 0.01, "logprobs": 1}):  # in-graph, then host
        same = [sampling(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True, **extra) for _ in prompts]
        first = [o.token_ids for o in generate(llm, prompts, same)]
        again = [o.token_ids for o in generate(llm, prompts, same)]
        alone = generate(llm, prompts[:1], same[:1])[0].token_ids  # other batch mates
        other = [
            o.token_ids
            for o in generate(
                llm, prompts, sampling(temperature=1.0, seed=8, max_tokens=24, ignore_eos=True, **extra)
            )
        ]
        assert first == again and alone == first[0]
        assert first != other


def test_padding_stats_through_collective_rpc(default_llm: tuple[Any, Path]) -> None:
    # what benchmarks/ reports as padding waste: every prompt token counted once, in packed prefill calls
    llm, _ = default_llm

    def stats() -> dict[tuple, tuple[float, ...]]:  # (real, padded, calls, seconds) per bucket
        return {tuple(row[:6]): tuple(row[6:]) for row in llm.collective_rpc("padding_stats")[0]}

    before = stats()
    lengths = [5, 30, 17, 60, 9, 44]
    prompts = token_prompts(len(lengths), lengths, tokenizer_vocab(llm), seed=3)
    began = time.perf_counter()
    generate(llm, prompts, sampling(temperature=0.0, max_tokens=10, ignore_eos=True))
    elapsed = time.perf_counter() - began
    delta = {
        bucket: tuple(now - then for now, then in zip(values, before.get(bucket, (0,) * 4), strict=True))
        for bucket, values in stats().items()
    }
    ran = {b: d for b, d in delta.items() if d[2]}  # (rows, tokens, context, sample, ...) -> its delta
    prefill = {b: d for b, d in ran.items() if b[1]}
    assert sum(real for real, *_ in prefill.values()) == sum(lengths)
    for (rows, tokens, *_), (real, pad, calls, _) in prefill.items():
        assert rows == SLOTS and pad >= 0 and real + pad == calls * tokens  # whole calls of the bucket
    decoded = sum(real for b, (real, *_) in ran.items() if not b[1])
    assert 0 < decoded <= len(lengths) * 9  # the rest of the 9 rode along in prefill calls
    seconds = [d[3] for d in ran.values()]
    assert all(s > 0 for s in seconds) and sum(seconds) < elapsed  # the time inside each bucket's calls


def metric(llm: Any, name: str) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def check_greedy(model_dir: Path, prompts: list[dict[str, list[int]]], outputs: list[Any]) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = prompt["prompt_token_ids"]
        assert out.token_ids == hf_logits(model_dir, ids, list(out.token_ids)).argmax(-1).tolist()


def test_prefix_cache_hits_give_hf_tokens(make_checkpoint: Callable[..., Path]) -> None:
    # requests sharing 3 blocks (96 tokens) with a request before them start from the cached blocks
    model_dir = make_checkpoint()
    llm = make_llm(model_dir)  # its own engine: another engine's shutdown unregisters the metrics
    try:
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching, "on by default, as in vLLM"
        shared = token_prompts(1, [96], 400, seed=5)[0]["prompt_token_ids"]
        tails = token_prompts(6, [3, 9, 20], 400, seed=6)
        prompts = [{"prompt_token_ids": shared + t["prompt_token_ids"]} for t in tails]
        params = sampling(temperature=0.0, max_tokens=8, ignore_eos=True)
        generate(llm, prompts[:1], params)
        hits = metric(llm, "vllm:prefix_cache_hits")
        check_greedy(model_dir, prompts, generate(llm, prompts, params))
        assert metric(llm, "vllm:prefix_cache_hits") - hits >= 6 * 96
    finally:
        shutdown(llm)


def test_preempted_requests_continue_with_the_same_tokens(make_checkpoint: Callable[..., Path]) -> None:
    # a pool of 10 blocks of 16 holds one 128-token sequence: the running ones are preempted and recomputed
    model_dir = make_checkpoint()
    prompts = token_prompts(6, [50, 70, 90], 400, seed=7)
    params = sampling(temperature=0.0, max_tokens=30, ignore_eos=True)
    small = make_llm(model_dir, block_size=16, num_gpu_blocks_override=10, async_scheduling=True)
    try:
        tokens = [o.token_ids for o in generate(small, prompts, params)]
        assert metric(small, "vllm:num_preemptions") > 0
    finally:
        shutdown(small)
    large = make_llm(model_dir, block_size=16)
    try:
        assert [o.token_ids for o in generate(large, prompts, params)] == tokens
    finally:
        shutdown(large)


def test_the_kv_pool_is_what_fits_the_memory_budget(
    make_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --num-gpu-blocks-override the pool is what fits --gpu-memory-utilization of a rank's memory
    beside its weights and graph scratch (here 3 full-length sequences' worth for 4 sequences), and paging
    shares it: 4 concurrent full-length requests are preempted in turn and still give HF's greedy tokens."""
    from vllm_neuron_qwen2 import placement
    from vllm_neuron_qwen2.compile.buckets import all_buckets
    from vllm_neuron_qwen2.compile.costs import core_memory
    from vllm_neuron_qwen2.config import NeuronConfig, Qwen2Shape

    model_dir = make_checkpoint()
    shape = Qwen2Shape.from_pretrained(model_dir)
    config = NeuronConfig(batch_size=SLOTS, seq_len=MAX_MODEL_LEN, max_num_batched_tokens=512).resolve(shape)
    need = core_memory(shape, config, all_buckets(config))
    block = need.pool // config.num_blocks
    budget = need.weights + need.scratch + 3 * config.blocks_per_seq * block + block // 2
    monkeypatch.setattr(placement, "memory_per_rank", lambda *_: (2 * budget, "a test's budget"))
    llm = make_llm(model_dir, gpu_memory_utilization=0.5)
    try:
        assert (
            llm.llm_engine.vllm_config.cache_config.num_gpu_blocks_override == 1 + 3 * config.blocks_per_seq
        )
        prompts = token_prompts(4, [60], tokenizer_vocab(llm), seed=9)
        params = sampling(temperature=0.0, max_tokens=MAX_MODEL_LEN - 60, ignore_eos=True)
        outputs = generate(llm, prompts, params)
        assert metric(llm, "vllm:num_preemptions") > 0
    finally:
        shutdown(llm)
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = prompt["prompt_token_ids"]
        assert list(out.token_ids) == hf_logits(model_dir, ids, list(out.token_ids)).argmax(-1).tolist()


def test_n_2(default_llm: tuple[Any, Path]) -> None:
    llm, _ = default_llm
    prompt = token_prompts(1, [12], tokenizer_vocab(llm), seed=3)
    for extra in ({}, {"logprobs": 2}):  # in-graph, then host sampling
        params = sampling(n=2, temperature=1.0, max_tokens=16, ignore_eos=True, **extra)
        (result,) = llm.generate(prompt, params, use_tqdm=False)
        assert len(result.outputs) == 2
        assert result.outputs[0].token_ids != result.outputs[1].token_ids


def _penalized(
    logits: torch.Tensor, prompt: list[int], past: list[int], rep: float, freq: float, pres: float
):
    counts = torch.bincount(torch.tensor(past, dtype=torch.int64), minlength=logits.shape[-1]).float()
    seen = counts > 0
    seen_any = seen.clone()
    seen_any[prompt] = True
    logits = torch.where(seen_any, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - freq * counts - pres * seen.float()


@pytest.mark.parametrize(
    ("rep", "freq", "pres", "logprobs"),
    # each penalty alone and all three, in the graph; all three on the host (logprobs send a row there)
    [
        (1.5, 0.0, 0.0, None),
        (1.0, 0.7, 0.0, None),
        (1.0, 0.0, 2.0, None),
        (1.5, 0.7, 1.2, None),
        (1.5, 0.7, 1.2, 1),
    ],
)
def test_penalties_match_reference(
    default_llm: tuple[Any, Path], rep: float, freq: float, pres: float, logprobs: int | None
) -> None:
    llm, model_dir = default_llm
    prompts = token_prompts(5, [3, 10, 30], tokenizer_vocab(llm), seed=4)
    params = sampling(
        temperature=0.0,
        max_tokens=25,
        ignore_eos=True,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
        logprobs=logprobs,
    )
    plain = generate(llm, prompts, sampling(temperature=0.0, max_tokens=25, ignore_eos=True))
    penalized = generate(llm, prompts, params)
    assert [o.token_ids for o in plain] != [o.token_ids for o in penalized]
    for prompt, out in zip(prompts, penalized, strict=True):
        ids, tokens = prompt["prompt_token_ids"], list(out.token_ids)
        logits = hf_logits(model_dir, ids, tokens)
        for step, token in enumerate(tokens):
            assert _penalized(logits[step], ids, tokens[:step], rep, freq, pres).argmax().item() == token


def test_logit_bias_allowed_ids_bad_words_min_tokens(default_llm: tuple[Any, Path]) -> None:
    llm, model_dir = default_llm
    tokenizer = llm.get_tokenizer()
    prompts = token_prompts(4, [6, 21], tokenizer_vocab(llm), seed=5)
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = [list(o.token_ids) for o in generate(llm, prompts, sampling(**greedy))]

    biased = generate(llm, prompts, sampling(**greedy, logit_bias={42: 100.0}))
    assert all(set(o.token_ids) == {42} for o in biased)

    allowed = [5, 77, 300]
    for out in generate(llm, prompts, sampling(**greedy, allowed_token_ids=allowed)):
        assert set(out.token_ids) <= set(allowed)

    # A word the tokenizer keeps as one token, taken from the unconstrained output.
    banned = next(
        t for t in plain[0] if tokenizer.encode(tokenizer.decode([t]), add_special_tokens=False) == [t]
    )
    word = tokenizer.decode([banned])
    out = generate(llm, prompts[:1], sampling(**greedy, bad_words=[word]))[0]
    assert banned not in out.token_ids and list(out.token_ids) != plain[0]

    # min_tokens: stop on each prompt's first greedy token, but only after 5 tokens.
    stops = [p[0] for p in plain]
    with_min = [sampling(temperature=0.0, max_tokens=12, stop_token_ids=[s], min_tokens=5) for s in stops]
    without = [sampling(temperature=0.0, max_tokens=12, stop_token_ids=[s]) for s in stops]
    assert all(len(o.token_ids) == 1 for o in generate(llm, prompts, without))
    for prompt, stop, out in zip(prompts, stops, generate(llm, prompts, with_min), strict=True):
        assert len(out.token_ids) >= 5 and stop not in out.token_ids[:4]
        logits = hf_logits(model_dir, prompt["prompt_token_ids"], list(out.token_ids))
        logits[:4, stop] = -torch.inf
        assert logits[:5].argmax(-1).tolist() == list(out.token_ids[:5])


def test_a_custom_logits_processor_applies_to_every_row(make_checkpoint: Callable[..., Path]) -> None:
    # `--logits-processors` run on the host, so with one configured no row samples in the graph
    from custom_logits_processor import ALLOWED

    llm = make_llm(make_checkpoint(), logits_processors=["custom_logits_processor:OnlyThreeTokens"])
    try:
        prompts = token_prompts(3, [6, 21], tokenizer_vocab(llm), seed=5)
        outputs = generate(llm, prompts, sampling(temperature=0.0, max_tokens=8, ignore_eos=True))
    finally:
        shutdown(llm)
    assert all(set(o.token_ids) <= set(ALLOWED) for o in outputs)


def test_prompt_logprobs_match_hf(configured: tuple[Any, Path]) -> None:
    # prompts of several lengths (longer than a 40-token step in one config), scored alongside ordinary
    # requests that decode in the same steps; every position's logprob against HF's log-softmax
    llm, model_dir = configured
    vocab = tokenizer_vocab(llm)
    whole_vocab = llm.llm_engine.model_config.max_logprobs == -1  # then k=-1: every token's logprob
    prompts = token_prompts(6, [2, 17, 33, 70, 120, 9], vocab, seed=9)
    k = -1 if whole_vocab else 3
    params = [
        sampling(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=k if i % 2 == 0 else None)
        for i in range(len(prompts))
    ]
    for i, (prompt, out) in enumerate(
        zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True)
    ):
        ids = prompt["prompt_token_ids"]
        if i % 2:
            assert out.prompt_logprobs is None
            continue
        with torch.no_grad():
            want = hf_model(model_dir)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for pos, entries in enumerate(out.prompt_logprobs[1:]):
            token = ids[pos + 1]
            assert set(want[pos].topk(3).indices.tolist()) <= set(entries) and token in entries
            assert len(entries) == (
                hf_model(model_dir).config.vocab_size
                if whole_vocab
                else 3 + (token not in want[pos].topk(3).indices)
            )
            for tok, entry in entries.items():
                assert abs(entry.logprob - want[pos, tok].item()) < TOL
            assert entries[token].rank == int((want[pos] > want[pos, token]).sum()) + 1


REGEX = r"[a-c]{3}-[0-9]{2}"
CHOICES = ["red", "green", "blue"]
GRAMMAR = 'root ::= "yes" | "no" | "maybe " [0-9]'


def check_structured(kind: str, text: str) -> None:
    import re

    if kind == "json":
        assert text.startswith("{"), repr(text)
        value = json.loads(text)
        assert (
            value["answer"] in ("yes", "no")
            and 0 <= value["count"] <= 9
            and set(value) == set(SCHEMA["required"])
        )
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"yes|no|maybe [0-9]", text), text


@pytest.mark.parametrize("tp,async_scheduling", [(1, True), (2, False)])
def test_structured_outputs_are_valid_and_leave_other_rows_alone(
    make_checkpoint: Callable[..., Path], tp: int, async_scheduling: bool
) -> None:
    from vllm import envs
    from vllm.sampling_params import StructuredOutputsParams

    envs.disable_envs_cache()  # let the platform's spawn default reach a TP executor
    llm = make_llm(
        make_checkpoint(),
        tensor_parallel_size=tp,
        async_scheduling=async_scheduling,
        # a random model would pad with whitespace; vLLM allows turning that off for xgrammar
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
    )
    try:
        kinds = {
            "json": StructuredOutputsParams(json=SCHEMA),
            "regex": StructuredOutputsParams(regex=REGEX),
            "choice": StructuredOutputsParams(choice=CHOICES),
            "grammar": StructuredOutputsParams(grammar=GRAMMAR),
        }
        plain = token_prompts(3, [5, 30, 12], 400, seed=11)
        plain_params = sampling(temperature=0.0, max_tokens=12, ignore_eos=True)
        alone = [o.token_ids for o in generate(llm, plain, plain_params)]
        prompts, params = list(plain), [plain_params] * len(plain)
        for seed, so in enumerate(kinds.values()):
            prompts += token_prompts(2, [8, 40], 400, seed=20 + seed)
            params += [
                sampling(temperature=1.0, seed=seed, n=2, max_tokens=40, structured_outputs=so),
                sampling(temperature=0.0, max_tokens=40, structured_outputs=so, logprobs=2),
            ]
        results = llm.generate(prompts, params, use_tqdm=False)
        assert [r.outputs[0].token_ids for r in results[: len(plain)]] == alone, "batch mates changed nothing"
        # the text of the token ids: vLLM's incremental detokenizer glues the undecodable bytes of a random
        # token-id prompt onto the first output text
        decode = llm.get_tokenizer().decode
        for i, kind in enumerate(kinds):
            for result in results[len(plain) + 2 * i : len(plain) + 2 * i + 2]:
                for out in result.outputs:
                    check_structured(kind, decode(out.token_ids, skip_special_tokens=True))
    finally:
        shutdown(llm)


def test_bad_request_features_are_rejected(default_llm: tuple[Any, Path]) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams

    llm, _ = default_llm
    prompt = token_prompts(1, [5], tokenizer_vocab(llm))
    with pytest.raises(VLLMValidationError, match="vocab"):
        llm.generate([{"prompt_token_ids": [1, 500]}], sampling(max_tokens=2), use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="logprobs"):
        llm.generate(prompt, sampling(max_tokens=2, prompt_logprobs=10**6), use_tqdm=False)
    for bad in ({"json": {"type": "no-such-type"}}, {"regex": "(unclosed"}, {"grammar": "root ::= ("}):
        with pytest.raises((VLLMValidationError, ValueError)):  # vLLM 0.16 raises a ValueError
            llm.generate(
                prompt,
                sampling(max_tokens=2, structured_outputs=StructuredOutputsParams(**bad)),
                use_tqdm=False,
            )
    # the engine keeps serving
    assert len(generate(llm, prompt, sampling(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


@pytest.mark.parametrize(
    ("geometry", "kwargs", "option"),
    [
        ({}, {"enable_lora": True}, "--enable-lora"),
        ({}, {"pipeline_parallel_size": 2}, "--pipeline-parallel-size"),
        ({"use_sliding_window": True, "sliding_window": 32}, {}, "use_sliding_window"),
        ({}, {"additional_config": {"neuron_config": {"batch_size": 8}}}, "--max-num-seqs"),
        ({}, {"additional_config": {"neuron_config": {"no_such_field": 1}}}, "no_such_field"),
        ({}, {"additional_config": {"neuron_config": {"prefill_lengths": [256]}}}, "prefill_lengths"),
        ({}, {"block_size": 24}, "--block-size"),
        ({}, {"num_gpu_blocks_override": 3}, "--num-gpu-blocks-override"),
        ({}, {"dtype": "float16"}, "float16 is not supported on the cpu backend; use float32 or bfloat16"),
        ({}, {"gpu_memory_utilization": 1e-6}, r"one sequence's KV cache takes .* lower --max-model-len"),
    ],
)
def test_startup_rejects_unsupported_configuration(
    make_checkpoint: Callable[..., Path], geometry: dict[str, Any], kwargs: dict[str, Any], option: str
) -> None:
    with pytest.raises(Exception, match=option):
        make_llm(make_checkpoint(**geometry), **kwargs)


def test_startup_rejects_other_architectures(tmp_path: Path, make_checkpoint: Callable[..., Path]) -> None:
    import json
    import shutil

    model_dir = shutil.copytree(make_checkpoint(), tmp_path / "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="LlamaForCausalLM"):
        make_llm(model_dir)


def test_plugin_is_inactive_without_backend_variable() -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "VLLM_NEURON_QWEN2_BACKEND"}
    code = "import vllm_neuron_qwen2 as p; print(p.register())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "vllm_neuron_qwen2.platform.NeuronQwen2Platform" if Path("/dev/neuron0").exists() else "None"
    )


def test_heads_not_divisible_by_tp_pass_vllm_config_checks(make_checkpoint: Callable[..., Path]) -> None:
    """vLLM itself wants heads divisible by TP; the platform lets the decoder pad them (6 heads, TP 4)."""
    from vllm.engine.arg_utils import EngineArgs

    model_dir = make_checkpoint(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, vocab_size=501)
    args = EngineArgs(
        model=str(model_dir), tensor_parallel_size=4, max_model_len=MAX_MODEL_LEN, max_num_seqs=SLOTS
    )
    config = args.create_engine_config()
    assert config.parallel_config.tensor_parallel_size == 4
    assert config.cache_config.num_gpu_blocks_override == 1 + SLOTS * MAX_MODEL_LEN // 32  # blocks of 32
