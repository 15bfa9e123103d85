"""What a bucket graph moves and computes per call and what a NeuronCore holds: plain arithmetic on the
shapes of one rank's decoder (built on the meta device, so the figures follow the layers' own sharding), for
`vllm-neuron-qwen2 plan`, the choice of the KV pool's size, and how a step is split into calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import NeuronConfig, Qwen2Shape
from ..model.parallel import TPGroup
from ..model.qwen2 import Qwen2Decoder
from .buckets import Bucket
from .cpu import keeps_plain_weights

# FLOPs a core computes in the time it streams one byte (its machine balance), what an extra call's weight
# stream costs in attention: a 2-core x86 VM ~100 GFLOP/s over ~20 GB/s (benchmarks/limits.py measures
# 93-148 over 16-46); a NeuronCore-v2 ~95 TFLOP/s of bf16 over ~410 GB/s (half an Inf2 / Trn1 chip's specs).
FLOPS_PER_BYTE = {"cpu": 5, "neuron": 230}


@dataclass(frozen=True)
class RankShape:
    """One rank's sizes in bytes (the model's dtype), from its shard."""

    weights: int  # every weight a graph call streams: the layers, the final norm and the lm_head
    layer_weights: int  # the decoder layers' alone
    embedding_row: int  # one token's embedding (a graph reads its tokens' rows of the table)
    embedding_table: int  # the embedding table, when it is not the lm_head's weight (tied)
    kv_position: int  # K and V of one position, over all layers
    vocab: int  # logits per row (the whole vocabulary: the logits are gathered over ranks)
    pool: int  # the KV pool
    score_flops: int  # one query against one key over all heads and layers: q.k and the weighted v

    @classmethod
    def of(cls, shape: Qwen2Shape, config: NeuronConfig) -> RankShape:
        with torch.device("meta"):
            decoder = Qwen2Decoder(shape, config, TPGroup(size=config.tp_degree))
        size = {name: p.numel() * p.element_size() for name, p in decoder.named_parameters()}
        embedding = size.pop("embed_tokens.weight", 0)  # a tied lm_head keeps this name, the table is read
        k, v = decoder.kv_cache.layer(0)
        per_layer = k[0].numel() * k.element_size() + v[0].numel() * v.element_size()
        return cls(
            weights=sum(size.values()) + (0 if "lm_head.weight" in size else embedding),
            layer_weights=sum(n for name, n in size.items() if name.startswith("layers.")),
            embedding_row=shape.hidden_size * k.element_size(),
            embedding_table=embedding if "lm_head.weight" in size else 0,
            kv_position=per_layer * shape.num_hidden_layers,
            vocab=shape.vocab_size,
            pool=sum(b.numel() * b.element_size() for b in decoder.kv_cache.buffers()),
            score_flops=4 * decoder.layers[0].self_attn.num_heads * shape.head_dim * shape.num_hidden_layers,
        )


@dataclass(frozen=True)
class Traffic:
    """Bytes one call of a bucket graph moves on one NeuronCore."""

    weights: int  # weights streamed, and the tokens' embedding rows
    kv_read: int  # K/V attention reads: each sequence's blocks, once per layer
    kv_written: int  # the gathered copies of those blocks, and the step's new K/V
    logits: int  # out of the graph: float32 logits, or int64 token ids when it samples

    @property
    def total(self) -> int:
        return self.weights + self.kv_read + self.kv_written + self.logits


def positions_gathered(bucket: Bucket, block_size: int) -> int:
    """KV positions a call gathers per layer: each decode row's block table, the chunks' key blocks."""
    keys = bucket.key_blocks(block_size) * block_size if bucket.tokens else 0
    return bucket.rows * bucket.context + keys


def scores(bucket: Bucket, block_size: int) -> int:
    """Query-key pairs a call's attention scores per head, masked ones included (a static graph computes
    them all): each row token against its row's context, each prompt token against the key blocks."""
    keys = bucket.key_blocks(block_size) * block_size if bucket.tokens else 0
    return bucket.row_token_count() * bucket.context + bucket.tokens * keys


def attention_flops(bucket: Bucket, rank: RankShape, block_size: int) -> int:
    return scores(bucket, block_size) * rank.score_flops


def traffic(bucket: Bucket, rank: RankShape, block_size: int) -> Traffic:
    tokens = bucket.row_token_count() + bucket.tokens
    gathered = positions_gathered(bucket, block_size) * rank.kv_position
    out = bucket.logit_rows() * (8 if bucket.sample else 4 * rank.vocab)
    return Traffic(
        weights=rank.weights + tokens * rank.embedding_row,
        kv_read=gathered,
        kv_written=gathered + tokens * rank.kv_position,
        logits=out,
    )


def scratch(bucket: Bucket, rank: RankShape, shape: Qwen2Shape, config: NeuronConfig) -> int:
    """An estimate of a call's largest live activations on one NeuronCore: one layer's gathered K/V and
    float32 attention scores, the MLP's intermediate and the logits."""
    tp, bs = config.tp_degree, config.block_size
    heads = -(-shape.num_attention_heads // tp)
    itemsize = rank.embedding_row // shape.hidden_size
    tokens = bucket.row_token_count() + bucket.tokens
    gathered = positions_gathered(bucket, bs) * rank.kv_position // shape.num_hidden_layers
    float32_scores = heads * scores(bucket, bs) * 4
    mlp = tokens * 2 * -(-shape.intermediate_size // tp) * itemsize
    return gathered + float32_scores + mlp + bucket.logit_rows() * 4 * rank.vocab


@dataclass(frozen=True)
class CoreMemory:
    """Bytes one NeuronCore holds."""

    weights: int  # the rank's weights, the embedding table too (cpu, float32: the layers' twice, see cpu.py)
    pool: int  # the KV pool
    scratch: int  # the largest graph call's live activations (an estimate)

    @property
    def total(self) -> int:
        return self.weights + self.pool + self.scratch


def core_memory(shape: Qwen2Shape, config: NeuronConfig, buckets: list[Bucket]) -> CoreMemory:
    rank = RankShape.of(shape, config)
    plain_copy = rank.layer_weights if keeps_plain_weights(config, buckets) else 0
    return CoreMemory(
        weights=rank.weights + rank.embedding_table + plain_copy,
        pool=rank.pool,
        scratch=max(scratch(b, rank, shape, config) for b in buckets),
    )


def blocks_that_fit(
    shape: Qwen2Shape, config: NeuronConfig, buckets: list[Bucket], memory: int, utilization: float
) -> int:
    """KV blocks that fit `utilization` of a NeuronCore's `memory` bytes beside weights and scratch."""
    need = core_memory(shape, config, buckets)
    block = config.block_size * RankShape.of(shape, config).kv_position
    return max(0, int((utilization * memory - need.weights - need.scratch) // block))
