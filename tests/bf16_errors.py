"""How far a bfloat16 engine is from HF float32, teacher-forced on HF float32's greedy continuation.

Every engine sees the same tokens: each prompt followed by the OUTPUT_TOKENS that HF float32 generates
greedily. At each of those positions the engine reports its own greedy choice and its logprob of the forced
token, and two errors follow: the gap between HF float32's best logit and its logit for the engine's choice (0
when both pick the same token), and |engine logprob - HF float32 logprob| of the forced token. A run is
summarised by the worst and the 98th percentile of each. Forcing one sequence on every engine compares them
at the same positions; on its own greedy path each engine would be measured on different tokens.

Shared by tests/test_bf16.py, tests/test_vllm_llm.py and tests/fixtures/record_vllm_cpu_bf16_errors.py
(vLLM's own CPU backend in bfloat16: the bound). Run as a script under torchrun (`torchrun --nproc-per-node N
tests/bf16_errors.py MODEL_DIR OUT`), it runs `standalone_forced` on N ranks and rank 0 saves the result.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# Checkpoints (make_tiny_qwen2 arguments), head_dim 32 as vLLM's CPU attention needs: one KV head under two
# query heads, and Qwen2-0.5B's 14 query / 2 KV heads.
CHECKPOINTS = {
    "gqa2": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "heads14_kv2": {"hidden_size": 448, "num_attention_heads": 14, "num_key_value_heads": 2},
}
# (checkpoint, TP degree) pairs measured; TP 2 sums row-parallel partial products, which changes the rounding
RUNS = [("gqa2", 1), ("heads14_kv2", 1), ("heads14_kv2", 2)]
# 32 prompts of 3-60 tokens, 32 forced tokens each: 1024 positions, enough for a steady 98th percentile
PROMPTS = [
    [(i * step + offset) % 449 for i in range(n)]
    for offset in (11, 5, 23, 41)
    for step, n in [(37, 7), (53, 20), (29, 45), (71, 33), (13, 3), (97, 60), (41, 12), (83, 26)]
]
OUTPUT_TOKENS = 32
MAX_MODEL_LEN = 128
VLLM_CPU_FIXTURE = Path(__file__).parent / "fixtures" / "vllm_cpu_bf16_errors.json"
WORSE_BY_AT_MOST = 1.10  # the plugin's errors against vLLM CPU's

# Per forced position: (the engine's greedy token, its logprob of the forced token).
Scores = list[list[tuple[int, float]]]


@functools.cache  # the reference of both `sequences` and `token_errors`
def hf_logits(model_dir: Path) -> list[torch.Tensor]:
    """HF float32's logits [OUTPUT_TOKENS, V] at the forced positions of each prompt (the positions that
    predict its continuation)."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=OUTPUT_TOKENS, do_sample=False)[0]
            out.append(hf(ids[None]).logits[0, len(prompt) - 1 : -1])
    return out


def sequences(model_dir: Path) -> list[list[int]]:
    """Each prompt followed by HF float32's greedy continuation."""
    return [p + logits.argmax(-1).tolist() for p, logits in zip(PROMPTS, hf_logits(model_dir), strict=True)]


def token_errors(model_dir: Path, scores: Scores) -> dict:
    """Summarise an engine's `scores`: {"gap": {"worst", "p98"}, "logprob": {"worst", "p98"}, "tokens"}."""
    gaps, logprob_errors = [], []
    for logits, engine in zip(hf_logits(model_dir), scores, strict=True):
        picked = torch.tensor([t for t, _ in engine])
        forced = logits.argmax(-1)
        gaps += (logits.max(-1).values - logits.gather(-1, picked[:, None])[:, 0]).tolist()
        hf_logprobs = logits.log_softmax(-1).gather(-1, forced[:, None])[:, 0]
        logprob_errors += (torch.tensor([lp for _, lp in engine]) - hf_logprobs).abs().tolist()
    return {"gap": _summary(gaps), "logprob": _summary(logprob_errors), "tokens": len(gaps)}


def run_name(checkpoint: str, tp: int) -> str:
    return f"{checkpoint} tp{tp}"


def vllm_cpu_errors(checkpoint: str, tp: int) -> dict:
    """vLLM CPU's bf16 figures on `checkpoint` at TP `tp` (the recorded fixture)."""
    return json.loads(VLLM_CPU_FIXTURE.read_text())["runs"][run_name(checkpoint, tp)]


def assert_within_vllm_cpu(checkpoint: str, tp: int, errors: dict) -> None:
    """Each of the four figures (greedy-logit gap and logprob error, worst and p98) at most 10% worse than
    vLLM CPU's in bfloat16 on `checkpoint` at the same TP degree (the recorded fixture)."""
    name = run_name(checkpoint, tp)
    bound = vllm_cpu_errors(checkpoint, tp)
    assert errors["tokens"] == bound["tokens"]
    for kind in ("gap", "logprob"):
        for stat in ("worst", "p98"):
            ours, theirs = errors[kind][stat], bound[kind][stat]
            assert ours <= WORSE_BY_AT_MOST * theirs, (
                f"{name} {kind} {stat}: ours {ours:.4f}, vLLM {theirs:.4f}"
            )


def vllm_prompt_scores(outputs: list) -> Scores:
    """Scores from vLLM RequestOutputs of `sequences(...)` generated with prompt_logprobs=1: per forced
    position, the rank-1 token and the forced token's logprob."""
    scores = []
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        positions = out.prompt_logprobs[len(prompt) :]
        forced = out.prompt_token_ids[len(prompt) :]
        scores.append(
            [
                (next(t for t, e in entries.items() if e.rank == 1), entries[token].logprob)
                for token, entries in zip(forced, positions, strict=True)
            ]
        )
    return scores


def standalone_forced(
    model_dir: Path, forced: list[list[int]], tp_degree: int = 1, load: Callable | None = None
) -> Scores:
    """The standalone API in bfloat16 on `forced` (prompt + continuation per row): one prefill of the
    prompts, then OUTPUT_TOKENS - 1 decode steps fed the forced tokens. `load(model_dir, config)` makes the
    model (default: the cpu backend's `from_pretrained`)."""
    from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM

    config = NeuronConfig(
        batch_size=len(PROMPTS), seq_len=MAX_MODEL_LEN, tp_degree=tp_degree, dtype="bfloat16"
    )
    model = (load or NeuronQwen2ForCausalLM.from_pretrained)(model_dir, config)
    slots = list(range(len(PROMPTS)))
    scores: Scores = [[] for _ in PROMPTS]
    logits = model.prefill(PROMPTS, slots)
    for step in range(OUTPUT_TOKENS):
        tokens = [seq[len(p) + step] for p, seq in zip(PROMPTS, forced, strict=True)]
        logprobs = logits.log_softmax(-1)
        for row, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
            scores[row].append((int(lp.argmax()), lp[token].item()))
        if step + 1 < OUTPUT_TOKENS:
            logits = model.decode(tokens, [len(p) + step for p in PROMPTS], slots)
    return scores


def _summary(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"worst": t.max().item(), "p98": torch.quantile(t, 0.98).item()}


if __name__ == "__main__":
    model_dir = Path(sys.argv[1])
    result = standalone_forced(model_dir, sequences(model_dir), tp_degree=int(os.environ["WORLD_SIZE"]))
    if os.environ["RANK"] == "0":
        Path(sys.argv[2]).write_text(json.dumps(result))
