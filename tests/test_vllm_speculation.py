"""n-gram speculative decoding through vLLM's `LLM(...)` (cpu backend): exact against HF and against no
speculation, seeded and sampled output, vLLM's counters, and the start-up errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from decoder_harness import self_repeating_token
from test_vllm_llm import (  # noqa: F401 (plugin_env: the module's autouse fixture)
    check_greedy,
    generate,
    hf_model,
    make_llm,
    metric,
    plugin_env,
    sampling,
    shutdown,
    token_prompts,
)


def ngram(k: int, **extra: Any) -> dict[str, Any]:
    return {
        "method": "ngram",
        "num_speculative_tokens": k,
        "prompt_lookup_min": 1,
        "prompt_lookup_max": 3,
        **extra,
    }


def copying_prompts(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Prompts that repeat a span: n-gram drafts come from them, as in code edits and retrieval answers."""
    spans = token_prompts(n, [5, 9, 13], 400, seed=seed)
    return [{"prompt_token_ids": s["prompt_token_ids"] * 4} for s in spans]


# name -> LLM kwargs. Together: K 1, 3 and 7; TP 1 and 2; prefix caching on and off; chunked prefill with
# prompts longer than a step; a pool that preempts.
RUNS = {
    "k3_prefix_caching_chunks_of_40": {"speculative_config": ngram(3), "max_num_batched_tokens": 40},
    "k1_preempting_pool_no_prefix_caching": {
        "speculative_config": ngram(1),
        "enable_prefix_caching": False,
        "block_size": 16,
        "num_gpu_blocks_override": 10,
    },
    "k7_tp2": {"speculative_config": ngram(7), "tensor_parallel_size": 2},
}


@pytest.mark.parametrize("name", RUNS)
def test_greedy_output_equals_no_speculation_and_hf(
    make_checkpoint: Callable[..., Path], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # copying prompts (drafts proposed) mixed with long ones chunked over steps; greedy tokens equal HF's
    # argmax, and equal the same engine options without speculation
    model_dir = make_checkpoint()
    prompts = copying_prompts(6, seed=11) + token_prompts(2, [70, 100], 400, seed=12)
    params = sampling(temperature=0.0, max_tokens=24, ignore_eos=True)
    kwargs = RUNS[name]
    with caplog.at_level(logging.INFO):
        llm = make_llm(model_dir, **kwargs)
    try:
        outputs = generate(llm, prompts, params)
        drafts, accepted = (metric(llm, f"vllm:spec_decode_num_{n}_tokens") for n in ("draft", "accepted"))
        stats = llm.collective_rpc("padding_stats")[0]
    finally:
        shutdown(llm)
    k = kwargs["speculative_config"]["num_speculative_tokens"]
    if "tensor_parallel_size" not in kwargs:  # rank 0 logs in this process
        assert f"speculative decoding: n-gram drafts, up to {k} per row" in caplog.text
        assert f"verify ({k + 1} tokens per row: 1 + drafts, rows" in caplog.text
    check_greedy(model_dir, prompts, outputs)
    assert drafts > 0 and accepted > 0, (drafts, accepted)
    assert any(row_tokens > 1 for _, _, _, _, row_tokens, *_ in stats), "verify graphs ran"
    if (
        "chunks" in name
    ):  # steps of 40 tokens: a 36-token chunk beside a row's 1 + 3 fills the largest prefill
        assert any(row_tokens > 1 and tokens for _, tokens, _, _, row_tokens, *_ in stats), (
            "drafts rode along"
        )
    plain = {key: value for key, value in kwargs.items() if key != "speculative_config"}
    llm = make_llm(model_dir, **plain)
    try:
        assert [o.token_ids for o in generate(llm, prompts, params)] == [o.token_ids for o in outputs]
    finally:
        shutdown(llm)


def chi_square_p(a: Counter, b: Counter) -> float:
    """p-value of a two-sample chi-square test that `a` and `b` count draws of one distribution."""
    cells = sorted(set(a) | set(b))
    table = torch.tensor([[a[c] for c in cells], [b[c] for c in cells]], dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    df = len(cells) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2).item()


def test_sampled_output_is_seeded_and_distributed_as_without_speculation(
    make_checkpoint: Callable[..., Path],
) -> None:
    # temperature 1, top-k 2: the first three tokens' joint frequencies over 400 seeded requests match those
    # without speculation (chi-square, p > 0.01); seeds reproduce. The prompt repeats the token the model
    # most likes to repeat, so its drafts (more of it) are often accepted.
    model_dir = make_checkpoint()
    prompt = [{"prompt_token_ids": [self_repeating_token(model_dir)] * 16}]
    params = [sampling(temperature=1.0, top_k=2, max_tokens=3, seed=s, ignore_eos=True) for s in range(400)]
    counts = []
    for spec in (ngram(3), None):
        llm = make_llm(model_dir, speculative_config=spec)
        try:
            outputs = [
                tuple(o.outputs[0].token_ids) for o in llm.generate(prompt * 400, params, use_tqdm=False)
            ]
            if spec:
                again = [
                    tuple(o.outputs[0].token_ids)
                    for o in llm.generate(prompt * 20, params[:20], use_tqdm=False)
                ]
                assert again == outputs[:20], "seeded requests reproduce"
                assert metric(llm, "vllm:spec_decode_num_accepted_tokens") > 0
        finally:
            shutdown(llm)
        counts.append(Counter(outputs))
    assert chi_square_p(*counts) > 0.01


def test_grammar_rows_speculate_within_their_grammar(make_checkpoint: Callable[..., Path]) -> None:
    # A row under a grammar drafts too: vLLM's scheduler keeps its drafts up to the first one the grammar
    # refuses (this prompt offers "x" after "ab", which the regex refuses), and the verify graph samples
    # each position among the tokens the grammar's bitmask allows there. Its greedy output equals the same
    # request sampled on the host (logprobs: no drafts, the bitmask applied to logits); drafts were checked,
    # some accepted and some rejected. Beside other rows: they speculate and equal HF, and a seeded
    # temperature-1 grammar row is valid and reproduces.
    from vllm.sampling_params import StructuredOutputsParams

    model_dir = make_checkpoint()
    llm = make_llm(model_dir, speculative_config=ngram(3))
    try:
        regex = "([a-c]{3}-){6}"
        grammar = StructuredOutputsParams(regex=regex)
        prompt = {"prompt_token_ids": llm.get_tokenizer().encode("cab-abx-bcx-ab")}
        greedy = sampling(temperature=0.0, max_tokens=40, structured_outputs=grammar)
        drafted = generate(llm, [prompt], greedy)[0]
        drafts, accepted = (metric(llm, f"vllm:spec_decode_num_{n}_tokens") for n in ("draft", "accepted"))
        assert drafts > accepted > 0, (drafts, accepted)
        on_host = generate(
            llm, [prompt], sampling(temperature=0.0, max_tokens=40, structured_outputs=grammar, logprobs=1)
        )[0]
        assert metric(llm, "vllm:spec_decode_num_draft_tokens") == drafts, "a host-sampled row drafts nothing"
        assert drafted.token_ids == on_host.token_ids and re.fullmatch(regex, drafted.text), drafted.text

        copying = copying_prompts(2, seed=14)
        seeded = sampling(temperature=1.0, seed=3, max_tokens=40, structured_outputs=grammar)
        free = sampling(temperature=0.0, max_tokens=12, ignore_eos=True)
        outputs = generate(llm, [prompt, prompt, *copying], [greedy, seeded, free, free])
        assert outputs[0].token_ids == drafted.token_ids
        assert re.fullmatch(regex, outputs[1].text), outputs[1].text
        assert generate(llm, [prompt], seeded)[0].token_ids == outputs[1].token_ids
        check_greedy(model_dir, copying, outputs[2:])
    finally:
        shutdown(llm)


def test_masked_and_penalized_rows_speculate(make_checkpoint: Callable[..., Path]) -> None:
    # Rows with allowed_token_ids, bad_words, min_tokens or penalties sample in the graph, so they draft, and
    # their drafts are checked beside each other's: outputs equal the same requests without speculation (where
    # those rows sample in the graph as well; test_vllm_llm checks them against HF), each differs from plain
    # greedy output, and drafts were proposed and accepted. vLLM 0.16 refuses min_tokens with speculation.
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor

    model_dir = make_checkpoint()
    names = ["allowed", "bad_words", "min_tokens", "penalties"]
    prompts = dict(zip(names, copying_prompts(4, seed=15), strict=True))
    if not hasattr(MinTokensLogitsProcessor, "apply_with_spec_decode"):  # its rejection sampler's
        del prompts["min_tokens"]
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = make_llm(model_dir, speculative_config=ngram(3))
    try:
        outputs = generate(llm, list(prompts.values()), sampling(**greedy))
        plain = {name: out.token_ids for name, out in zip(prompts, outputs, strict=True)}
        tokenizer = llm.get_tokenizer()
        # a bad word of two tokens from a plain output (vLLM bans its second token after its first)
        pairs = (plain["bad_words"][i : i + 2] for i in range(len(plain["bad_words"]) - 1))
        banned = next(p for p in pairs if tokenizer.encode(tokenizer.decode(p).lstrip()) == p)
        allowed = sorted(set(prompts["allowed"]["prompt_token_ids"]))
        params = {
            "allowed": sampling(**greedy, allowed_token_ids=allowed),
            "bad_words": sampling(**greedy, bad_words=[tokenizer.decode(banned)]),
            # Qwen2.5-Instruct's generation config asks for a repetition penalty of 1.05
            "penalties": sampling(
                **greedy, repetition_penalty=1.05, frequency_penalty=0.1, presence_penalty=0.1
            ),
        }
        if "min_tokens" in prompts:
            stop = plain["min_tokens"][0]
            params["min_tokens"] = sampling(
                temperature=0.0, max_tokens=24, min_tokens=16, stop_token_ids=[stop]
            )
        params = [params[name] for name in prompts]
        outputs = generate(llm, list(prompts.values()), params)
        drafted = {name: out.token_ids for name, out in zip(prompts, outputs, strict=True)}
        drafts, accepted = (metric(llm, f"vllm:spec_decode_num_{n}_tokens") for n in ("draft", "accepted"))
    finally:
        shutdown(llm)
    llm = make_llm(model_dir)
    try:
        assert [o.token_ids for o in generate(llm, list(prompts.values()), params)] == list(drafted.values())
    finally:
        shutdown(llm)
    assert drafts > 0 and accepted > 0, (drafts, accepted)
    assert all(drafted[name] != plain[name] for name in prompts), "each row's parameters tell"
    assert set(drafted["allowed"]) <= set(allowed) and len(drafted.get("min_tokens", range(16))) >= 16
    assert all(drafted["bad_words"][i : i + 2] != banned for i in range(len(drafted["bad_words"]) - 1))


def test_no_row_drafts_while_a_request_sampled_on_the_host_runs(make_checkpoint: Callable[..., Path]) -> None:
    # A request that asks for logprobs is sampled on the host from logits, which a verify graph does not
    # return; while it runs, nothing drafts (no drafts to leave unchecked, nor to take the step's token
    # budget), and outputs stay HF's. Without it, the same prompts draft.
    model_dir = make_checkpoint()
    prompts = copying_prompts(3, seed=16)
    greedy = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = make_llm(model_dir, speculative_config=ngram(3))
    try:
        params = [sampling(**greedy), sampling(**greedy), sampling(**greedy, logprobs=2)]
        with_host_row = generate(llm, prompts, params)
        assert metric(llm, "vllm:spec_decode_num_draft_tokens") == 0
        check_greedy(model_dir, prompts, with_host_row)
        generate(llm, prompts, sampling(**greedy))
        assert metric(llm, "vllm:spec_decode_num_draft_tokens") > 0
    finally:
        shutdown(llm)


DRAFT_ARCHITECTURES = {
    "eagle": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "medusa": {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "num_heads": 2,
        "num_hidden_layers": 1,
    },
}


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ({"method": "draft_model", "num_speculative_tokens": 2}, {}, "'ngram' only"),
        ({"method": "eagle", "num_speculative_tokens": 2}, {}, "'ngram' only"),
        ({"method": "medusa", "num_speculative_tokens": 2}, {}, "'ngram' only"),
        (ngram(8), {}, "verifies 1 to 7 drafts per row"),
        (ngram(3), {"async_scheduling": True}, "async scheduling is only supported"),  # vLLM's own refusal
    ],
)
def test_startup_rejects_unsupported_speculation(
    make_checkpoint: Callable[..., Path],
    tmp_path: Path,
    spec: dict[str, Any],
    extra: dict[str, Any],
    message: str,
) -> None:
    model_dir = make_checkpoint()
    draft = {}
    if spec["method"] != "ngram":  # a draft checkpoint of the kind the method loads, from the tiny one
        draft_dir = tmp_path / spec["method"]
        shutil.copytree(model_dir, draft_dir)
        config = json.loads((draft_dir / "config.json").read_text())
        config |= DRAFT_ARCHITECTURES.get(spec["method"], {})
        config.pop("layer_types", None)  # a Qwen2 field the other kinds do not take
        (draft_dir / "config.json").write_text(json.dumps(config))
        draft = {"model": str(draft_dir)}
    with pytest.raises(Exception, match=message):
        make_llm(model_dir, speculative_config=spec | draft, **extra)


def test_min_p_is_refused_as_vllm_refuses_it(make_checkpoint: Callable[..., Path]) -> None:
    llm = make_llm(make_checkpoint(), speculative_config=ngram(2))
    try:
        # vLLM 0.16's message names min_tokens too
        with pytest.raises(Exception, match="min_p,? and logit_bias sampling parameters are not yet"):
            llm.generate(copying_prompts(1, seed=3), sampling(min_p=0.1, max_tokens=2), use_tqdm=False)
    finally:
        shutdown(llm)
