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
from .sampling import sample


class BucketGraph(nn.Module):
    """Inputs, laid out as `Qwen2Decoder.forward` takes them: input_ids, position_ids, slot_mapping
    [bucket.rows + bucket.tokens] int64, block_tables [bucket.block_table_rows(), context / block_size] int64,
    logit_index [R] int64 and sampling [R, 4] float32, R = bucket.logit_rows().
    Returns logits [R, V] float32, or token ids [R] int64 when the bucket samples.
    """

    def __init__(self, decoder: Qwen2Decoder, bucket: Bucket):
        super().__init__()
        self.decoder, self.bucket = decoder, bucket

    def forward(self, input_ids, position_ids, slot_mapping, block_tables, logit_index, sampling):
        logits = self.decoder(
            input_ids, position_ids, slot_mapping, block_tables, logit_index, self.bucket.rows
        )
        if self.bucket.sample:
            return sample(logits, sampling, self.decoder.config.max_topk)
        return logits


def example_inputs(bucket: Bucket, block_size: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the bucket's shapes, every token at position 0 of the padding block (distinct tensors:
    torch.compile guards on inputs aliasing each other)."""
    n = bucket.rows + bucket.tokens
    ids, positions, slots = (torch.zeros(n, dtype=torch.int64) for _ in range(3))
    tables = torch.full((bucket.block_table_rows(), bucket.context // block_size), PADDING_BLOCK)
    rows = bucket.logit_rows()
    return ids, positions, slots, tables, torch.arange(rows), torch.zeros(rows, 4)
