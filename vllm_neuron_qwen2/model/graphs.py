"""Bucket graphs: one nn.Module per static shape, all sharing one decoder (weights and KV cache).

A graph is a pure static-shape function of weights, KV state and its inputs, which is what
torch.export, torch.compile and the Neuron tracer need.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compile.buckets import Bucket
from .kv_cache import PADDING_BLOCK
from .qwen2 import Qwen2Decoder
from .sampling import Penalties, all_tokens_bitmask, sample


class BucketGraph(nn.Module):
    """Inputs, laid out as `Qwen2Decoder.forward` takes them, N = bucket.row_token_count() + bucket.tokens:
    input_ids, position_ids, slot_mapping [N] int64; block_tables [bucket.block_table_rows(), context /
    block_size] int64; key_blocks, key_starts [KB] int64 and key_visible [max(tokens, 1), KB] bool, KB =
    bucket.key_blocks(block_size); logit_index [R] int64, sampling [R, 4] float32, token_bitmask
    [R, ceil(V / 32)] int32 (the tokens each row may sample) and penalties' factors [R, 3] float32, token
    ids [R, 2, P] int32 and counts [R, P] float32, P = penalty_width, R = bucket.logit_rows(). Returns
    logits [R, V] float32, or token ids [R] int64 when the bucket samples.
    """

    def __init__(self, decoder: Qwen2Decoder, bucket: Bucket):
        super().__init__()
        self.decoder, self.bucket = decoder, bucket

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *decoder_inputs, sampling, token_bitmask, penalty_factors, penalty_ids, penalty_counts = inputs
        logits = self.decoder(*decoder_inputs, self.bucket.rows, self.bucket.row_tokens)
        if self.bucket.sample:
            penalties = Penalties(penalty_factors, penalty_ids, penalty_counts)
            return sample(logits, sampling, self.decoder.config.max_topk, token_bitmask, penalties)
        return logits


def penalty_width(bucket: Bucket, vocab_size: int) -> int:
    """The most distinct tokens a row's penalties apply to: its prompt and output fit the bucket's context."""
    return min(bucket.context, vocab_size)


def example_inputs(bucket: Bucket, block_size: int, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the bucket's shapes, every token at position 0 of the padding block, which every prompt
    token may read (distinct tensors: torch.compile guards on inputs aliasing each other)."""
    n, key_blocks = bucket.row_token_count() + bucket.tokens, bucket.key_blocks(block_size)
    ids, positions, slots = (torch.zeros(n, dtype=torch.int64) for _ in range(3))
    tables = torch.full((bucket.block_table_rows(), bucket.context // block_size), PADDING_BLOCK)
    visible = torch.zeros(max(bucket.tokens, 1), key_blocks, dtype=torch.bool)
    visible[:, 0] = True
    rows = bucket.logit_rows()
    return (
        ids,
        positions,
        slots,
        tables,
        torch.full((key_blocks,), PADDING_BLOCK),
        torch.zeros(key_blocks, dtype=torch.int64),
        visible,
        torch.arange(rows),
        torch.zeros(rows, 4),
        all_tokens_bitmask(rows, vocab_size),
        *Penalties.none(rows, penalty_width(bucket, vocab_size)),
    )
