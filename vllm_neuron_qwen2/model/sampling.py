"""In-graph sampler: greedy, temperature, top-k and top-p with static shapes; only token ids leave the graph.

Each row's random draw comes in as an input (`uniform`), so seeded requests stay reproducible and the
graph itself holds no RNG state. So does each row's set of allowed tokens (a grammar's, in vLLM's packed
bitmask layout), so rows under a grammar sample in the graph too. As on Neuron, sampling looks at the
`max_topk` best allowed tokens only.
"""

from __future__ import annotations

import torch

# columns of the [B, 4] float32 sampling tensor
TEMPERATURE, TOP_K, TOP_P, UNIFORM = range(4)
GREEDY_BELOW = 1e-5  # vLLM treats temperature < 1e-5 as greedy
BIT_VALUES = [1 << i for i in range(31)] + [-(1 << 31)]  # int32 words: bit 31 is the sign


def bitmask_words(vocab_size: int) -> int:
    """int32 words of a token bitmask row: one bit per token."""
    return (vocab_size + 31) // 32


def all_tokens_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 with every token allowed."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def allowed_tokens(token_bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, words] int32 -> [B, V] bool. vLLM's (xgrammar's) layout: bit t % 32 of word t // 32 is token t."""
    # a mask per bit, not `>>`: torch-xla 2.9 got int32 shifts by a tensor wrong
    bits = torch.tensor(BIT_VALUES, dtype=torch.int32, device=token_bitmask.device)
    return ((token_bitmask[:, :, None] & bits) != 0).flatten(1)[:, :vocab_size]


def mask_disallowed(logits: torch.Tensor, token_bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens token_bitmask [B, words] does not allow at -inf, as vLLM's
    apply_grammar_bitmask leaves them."""
    return torch.where(allowed_tokens(token_bitmask, logits.shape[-1]), logits, -torch.inf)


def sample(
    logits: torch.Tensor, params: torch.Tensor, max_topk: int, token_bitmask: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [B, V] float32, params [B, 4], token_bitmask [B, words] int32 (None: every token allowed)
    -> token ids [B] int64."""
    if token_bitmask is not None:
        logits = mask_disallowed(logits, token_bitmask)
    temperature, top_k, top_p, uniform = params.unbind(-1)
    k_max = min(max_topk, logits.shape[-1])
    top_logits, top_ids = logits.topk(k_max, dim=-1)  # [B, K], best first
    rank = torch.arange(k_max, device=logits.device)[None, :]
    k = torch.where(top_k >= 1, top_k.clamp(max=k_max), torch.full_like(top_k, k_max))
    scaled = (top_logits / temperature.clamp(min=GREEDY_BELOW)[:, None]).masked_fill(
        rank >= k[:, None], -torch.inf
    )
    probs = scaled.softmax(-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (the best token always stays)
    probs = probs * ((probs.cumsum(-1) - probs) < top_p[:, None])
    cdf = probs.cumsum(-1)
    choice = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=k_max - 1)
    sampled = top_ids.gather(-1, choice[:, None])[:, 0]
    return torch.where(temperature < GREEDY_BELOW, top_ids[:, 0], sampled)
