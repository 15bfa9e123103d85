"""Buckets: the static shapes graphs are built for, and the choice of the smallest one that fits."""

from __future__ import annotations

import bisect
from typing import NamedTuple

from ..config import PREFILL_TILE, NeuronConfig

SCORE_TOKENS = 128


class Bucket(NamedTuple):
    rows: int  # one-token rows (decode steps), which are also the rows of logits out
    tokens: int  # prompt-chunk tokens, in tiles of PREFILL_TILE (0: a decode graph)
    context: int  # KV positions every row and tile attends to
    sample: bool  # sample in the graph (token ids out) instead of returning logits
    scores: bool = False  # logits of every token (prompt logprobs), not of each row's last one

    @property
    def kind(self) -> str:
        return "score" if self.scores else "prefill" if self.tokens else "decode"

    def __str__(self) -> str:
        shape = (
            f"{self.rows}+{self.tokens}" if self.tokens and not self.scores else f"{self.rows or self.tokens}"
        )
        return f"{self.kind}[{shape}x{self.context}{'+sample' if self.sample else ''}]"

    def block_table_rows(self) -> int:
        return self.rows + self.tokens // PREFILL_TILE

    def logit_rows(self) -> int:
        return self.tokens if self.scores else self.rows


def all_buckets(config: NeuronConfig) -> list[Bucket]:
    """Every graph a model with this config may run, decode first (the hot path).

    Decode graphs come in a logits and an in-graph-sampling variant. A prefill graph carries `batch_size`
    one-token rows (any step has at most that many sequences), attends to the longest context, and
    returns logits: prefill steps are few and compute-bound, so sampling them on the host costs nothing
    that a second graph per size would save. One score graph returns the logits of every token of up to
    SCORE_TOKENS prompt tokens, for the requests that ask for prompt logprobs (longer prompts take
    several calls).
    """
    samples = (False, True) if config.on_device_sampling else (False,)
    decode = [
        Bucket(rows, 0, context, s)
        for rows in config.decode_batch_sizes
        for context in config.context_lengths
        for s in samples
    ]
    prefill = [
        Bucket(config.batch_size, t, config.context_lengths[-1], False) for t in config.prefill_lengths
    ]
    score = Bucket(0, min(SCORE_TOKENS, config.prefill_lengths[-1]), config.context_lengths[-1], False, True)
    return decode + prefill + [score]


def describe(buckets: list[Bucket]) -> str:
    """One line: how many graphs of which kind and shapes (what a user pays in compile time and memory)."""
    decode = [b for b in buckets if b.kind == "decode"]
    prefill = [b for b in buckets if b.kind == "prefill"]
    score = [b for b in buckets if b.kind == "score"]

    def sizes(values: set[int]) -> str:
        return ",".join(map(str, sorted(values)))

    parts = []
    if decode:
        variants = "logits and in-graph sampling" if any(b.sample for b in decode) else "logits"
        parts.append(
            f"{len(decode)} decode (rows {sizes({b.rows for b in decode})} x context "
            f"{sizes({b.context for b in decode})}, {variants})"
        )
    if prefill:
        parts.append(
            f"{len(prefill)} prefill (prompt tokens {sizes({b.tokens for b in prefill})} + "
            f"{prefill[0].rows} rows x context {prefill[0].context})"
        )
    if score:
        parts.append(f"{len(score)} score ({score[0].tokens} prompt tokens, for prompt logprobs)")
    return f"{len(buckets)} bucket graphs: " + ", ".join(parts)


def smallest_fitting(sizes: list[int], needed: int, what: str, field: str) -> int:
    """The smallest bucket size >= needed; a clear error when even the largest is too small."""
    i = bisect.bisect_left(sizes, needed)
    if i == len(sizes):
        raise ValueError(
            f"{what} {needed} exceeds the largest bucket {sizes[-1]} (neuron_config.{field}={sizes})"
        )
    return sizes[i]
