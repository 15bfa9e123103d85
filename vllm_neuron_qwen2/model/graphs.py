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
    """Inputs, int64 [B] or [B, L] plus sampling [B, 4] float32:
    prefill (input_ids [B, L], last_index, seq_ids, sampling);
    decode (input_ids, position_ids, seq_ids, sampling).
    Returns logits [B, V] float32, or token ids [B] int64 when the bucket samples.
    """

    def __init__(self, decoder: Qwen2Decoder, bucket: Bucket):
        super().__init__()
        self.decoder, self.bucket = decoder, bucket

    def forward(self, input_ids, index, seq_ids, sampling):
        if self.bucket.kind == "prefill":
            logits = self.decoder.prefill(input_ids, index, seq_ids)
        else:
            logits = self.decoder.decode(input_ids, index, seq_ids, self.bucket.length)
        if self.bucket.sample:
            return sample(logits, sampling, self.decoder.config.max_topk)
        return logits

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        b, n = self.bucket.batch, self.bucket.length
        ids = torch.zeros((b, n) if self.bucket.kind == "prefill" else (b,), dtype=torch.int64)
        index = torch.zeros(b, dtype=torch.int64)
        seq_ids = torch.arange(b, dtype=torch.int64)
        sampling = torch.zeros(b, 4, dtype=torch.float32)
        return ids, index, seq_ids, sampling
