"""Speculative decoding on the host: draft proposers, and the rule that turns verify graph tokens into output.

A step's decode row carrying d drafts runs as 1 + d tokens in a verify graph, which samples a token after
each of them (`NeuronQwen2ForCausalLM.verify_paged`); `accepted_tokens` keeps the drafts up to the first one
the graph did not sample, then the graph's token there. A proposer only has to say which tokens to try next:
n-gram lookup is the first; an EAGLE draft model would be another (README, "Speculative decoding").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class DraftProposer(Protocol):
    num_drafts: int  # the most drafts a row carries (the verify graphs' row tokens minus one)

    def propose(self, sequences: Sequence[Sequence[int]], rooms: Sequence[int]) -> list[list[int]]:
        """Drafts to follow each sequence (its prompt and outputs), at most `rooms[i]` for sequence i."""
        ...


class NgramProposer:
    """Prompt lookup: find the longest suffix of n tokens (min_n <= n <= max_n) that occurred earlier in the
    sequence, at its earliest occurrence, and draft the tokens that followed it (as vLLM's n-gram does)."""

    def __init__(self, num_drafts: int, min_n: int, max_n: int) -> None:
        self.num_drafts, self.min_n, self.max_n = num_drafts, min_n, max_n

    def propose(self, sequences: Sequence[Sequence[int]], rooms: Sequence[int]) -> list[list[int]]:
        return [self._lookup(np.asarray(seq), room) for seq, room in zip(sequences, rooms, strict=True)]

    def _lookup(self, seq: np.ndarray, room: int) -> list[int]:
        take = min(self.num_drafts, room)
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            if take <= 0:
                break
            earlier = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every n-gram ending before it
            hits = np.flatnonzero((earlier == seq[-n:]).all(axis=1))
            if hits.size:
                follow = hits[0] + n
                return seq[follow : follow + take].tolist()
        return []


def accepted_tokens(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """A verify row's output: `sampled[j]` is the token sampled after the row's token j (its last output, then
    its drafts). Drafts are kept while each equals the token sampled before it; the first one that does not is
    replaced by that token, and when all are kept the token after the last one follows (the bonus token).
    With one-hot drafts this is rejection sampling: draft j is kept with the target's probability of it, and
    a replacement is drawn from the target without it."""
    kept = 0
    while kept < len(drafts) and drafts[kept] == sampled[kept]:
        kept += 1
    return [*drafts[:kept], sampled[kept]]
