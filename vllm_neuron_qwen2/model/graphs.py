"""Bucket graphs: one nn.Module per static shape, all sharing one decoder (weights and KV cache).

A graph is a pure static-shape function of weights, KV state and its inputs, which is what
torch.export, torch.compile and the Neuron tracer need.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compile.buckets import Bucket
from .qwen2 import Qwen2Decoder
from .sampling import sample


class BucketGraph(nn.Module):
    """Inputs input_ids, position_ids, seq_ids [N] int64, logit_index [R] int64, sampling [R, 4] float32,
    laid out as `Qwen2Decoder.forward` takes them:
    decode: N = R = bucket.batch rows, attending to bucket.length cache positions;
    prefill: R = bucket.batch decode rows (attending to the whole cache), then bucket.length packed prompt
    tokens.
    Returns logits [R, V] float32, or token ids [R] int64 when the bucket samples.
    """

    def __init__(self, decoder: Qwen2Decoder, bucket: Bucket):
        super().__init__()
        self.decoder, self.bucket = decoder, bucket

    def forward(self, input_ids, position_ids, seq_ids, logit_index, sampling):
        b = self.bucket
        attend_len = self.decoder.config.seq_len if b.kind == "prefill" else b.length
        logits = self.decoder(input_ids, position_ids, seq_ids, logit_index, b.batch, attend_len)
        if b.sample:
            return sample(logits, sampling, self.decoder.config.max_topk)
        return logits


def example_inputs(bucket: Bucket) -> tuple[torch.Tensor, ...]:
    """Inputs of the bucket's shapes, every token in slot 0 at position 0 (distinct tensors: torch.compile
    guards on inputs aliasing each other)."""
    ids, positions, slots = (torch.zeros(bucket.tokens(), dtype=torch.int64) for _ in range(3))
    return ids, positions, slots, torch.arange(bucket.batch), torch.zeros(bucket.batch, 4)
