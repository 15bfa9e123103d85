"""Buckets: the static shapes graphs are built for, and the choice of the smallest one that fits."""

from __future__ import annotations

import bisect
from typing import NamedTuple

from ..config import NeuronConfig


class Bucket(NamedTuple):
    kind: str  # "prefill" or "decode"
    batch: int  # rows out; decode: one token per row; prefill: also the decode rows it carries
    length: int  # prefill: packed prompt tokens; decode: attended KV positions
    sample: bool  # sample in the graph (token ids out) instead of returning logits

    def __str__(self) -> str:
        return f"{self.kind}[{self.batch}x{self.length}{'+sample' if self.sample else ''}]"

    def tokens(self) -> int:
        """Tokens in: one per row, plus the packed prompt tokens of a prefill bucket."""
        return self.batch + (self.length if self.kind == "prefill" else 0)


def all_buckets(config: NeuronConfig) -> list[Bucket]:
    """Every graph a model with this config may run, decode first (the hot path). A prefill graph
    always carries `batch_size` rows: any step has at most that many requests, new or decoding."""
    samples = (False, True) if config.on_device_sampling else (False,)
    return [
        Bucket(kind, batch, length, s)
        for kind, batches, lengths in (
            ("decode", config.decode_batch_sizes, config.decode_lengths),
            ("prefill", [config.batch_size], config.prefill_lengths),
        )
        for batch in batches
        for length in lengths
        for s in samples
    ]


def smallest_fitting(sizes: list[int], needed: int, what: str, field: str) -> int:
    """The smallest bucket size >= needed; a clear error when even the largest is too small."""
    i = bisect.bisect_left(sizes, needed)
    if i == len(sizes):
        raise ValueError(
            f"{what} {needed} exceeds the largest bucket {sizes[-1]} (neuron_config.{field}={sizes})"
        )
    return sizes[i]
