"""In-graph sampler: greedy, temperature, top-k and top-p with static shapes; only token ids leave the graph.

Each row's random draw comes in as an input (`uniform`), so seeded requests stay reproducible and the
graph itself holds no RNG state. So does each row's set of allowed tokens (a grammar's, in vLLM's packed
bitmask layout), so rows under a grammar sample in the graph too, and its penalties with the tokens they
apply to (`Penalties`). As on Neuron, sampling looks at the `max_topk` best allowed tokens only.
"""

from __future__ import annotations

from typing import NamedTuple

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


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> [B, words] int32: `allowed_tokens`'s inverse."""
    bits = torch.nn.functional.pad(allowed, (0, (-allowed.shape[-1]) % 32)).unflatten(-1, (-1, 32))
    return (bits.long() * torch.tensor(BIT_VALUES)).sum(-1).int()  # the sum fits: bit 31 is the sign


def allowed_tokens(token_bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, words] int32 -> [B, V] bool. vLLM's (xgrammar's) layout: bit t % 32 of word t // 32 is token t."""
    # a mask per bit, not `>>`: torch-xla 2.9 got int32 shifts by a tensor wrong
    bits = torch.tensor(BIT_VALUES, dtype=torch.int32, device=token_bitmask.device)
    return ((token_bitmask[:, :, None] & bits) != 0).flatten(1)[:, :vocab_size]


def mask_disallowed(logits: torch.Tensor, token_bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with the tokens token_bitmask [B, words] does not allow at -inf, as vLLM's
    apply_grammar_bitmask leaves them."""
    return torch.where(allowed_tokens(token_bitmask, logits.shape[-1]), logits, -torch.inf)


class Penalties(NamedTuple):
    """vLLM's penalties of B rows: `factors` [B, 3] float32 (repetition, frequency, presence); `token_ids`
    [B, 2, S] int32, the distinct tokens of prompt or output (repetition) and of output (frequency, presence),
    padded with -1; `counts` [B, S] float32, how often each of the latter occurs in the output. Listing
    tokens, not masking the vocabulary, keeps the cost at S per row."""

    factors: torch.Tensor
    token_ids: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def none(cls, rows: int, width: int) -> Penalties:
        """Rows without penalties: factors (1, 0, 0), no tokens."""
        factors = torch.tensor([[1.0, 0.0, 0.0]]).repeat(rows, 1)
        return cls(factors, torch.full((rows, 2, width), -1, dtype=torch.int32), torch.zeros(rows, width))

    @classmethod
    def listed(cls, rows: list[PenaltyRow | None]) -> Penalties:
        """Rows' penalties (None: none), their lists padded to the longest."""
        out = cls.none(len(rows), max(len(row.repeated) for row in rows if row is not None))
        for i, row in enumerate(rows):
            if row is not None:
                out.factors[i] = torch.tensor(row.factors)
                out.token_ids[i, 0, : len(row.repeated)] = row.repeated
                out.token_ids[i, 1, : len(row.output_counts)] = torch.tensor(list(row.output_counts))
                out.counts[i, : len(row.output_counts)] = torch.tensor(list(row.output_counts.values()))
        return out

    def select(self, rows: list[int] | torch.Tensor) -> Penalties:
        return Penalties(self.factors[rows], self.token_ids[rows], self.counts[rows])


class PenaltyRow(NamedTuple):
    """One row's penalties as the host knows them."""

    factors: tuple[float, float, float]  # repetition, frequency, presence
    repeated: torch.Tensor  # the distinct tokens of prompt or output, int64
    output_counts: dict[int, int]  # the output's tokens, and how often each occurs


def penalize(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """logits [B, V] as vLLM's apply_penalties leaves them: the repeated tokens' scaled towards zero (divided
    by the repetition penalty when positive, else multiplied), the output's lowered by the frequency penalty
    times their count and by the presence penalty."""
    repetition, frequency, presence = penalties.factors.split(1, dim=-1)
    repeated, present = penalties.token_ids.unbind(1)
    counts = torch.where(present >= 0, penalties.counts, penalties.counts[:, :1])  # padding: the first's
    logits = _change_listed(logits, repeated, lambda x: x * torch.where(x > 0, 1.0 / repetition, repetition))
    return _change_listed(logits, present, lambda x: x - frequency * counts - presence)


def _change_listed(logits: torch.Tensor, token_ids: torch.Tensor, change) -> torch.Tensor:
    """logits [B, V] with `change` applied at token_ids [B, S] (-1: none). Padding points at the row's first
    token and writes what that one writes; a row without tokens writes token 0's logit back unchanged."""
    listed = token_ids[:, :1] >= 0
    ids = torch.where(token_ids >= 0, token_ids, token_ids[:, :1]).clamp(min=0).long()
    before = logits.gather(1, ids)
    return logits.scatter(1, ids, torch.where(listed, change(before), before))


def sample(
    logits: torch.Tensor,
    params: torch.Tensor,
    max_topk: int,
    token_bitmask: torch.Tensor | None = None,
    penalties: Penalties | None = None,
) -> torch.Tensor:
    """logits [B, V] float32, params [B, 4], token_bitmask [B, words] int32 (None: every token allowed),
    penalties (None: none) -> token ids [B] int64."""
    if penalties is not None:
        logits = penalize(logits, penalties)
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
