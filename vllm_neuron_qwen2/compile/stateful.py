"""The bucket graphs as an XLA compiler takes them: NxD's ModelBuilder (the neuron backend), or torch-xla
itself (tests/xla_graphs.py: on torch-xla's CPU device here, on a NeuronCore on a Neuron host).

Each graph is a pure function of one rank's weights, the KV pool and its inputs. It returns its result and
then every KV pool tensor it updated, in the order of the pool's parameters; the compiler aliases each of
those outputs to its input, so the pool stays on the device and is updated in place (model/kv_cache.py's
KVState). One rank's graph serves every rank (SPMD): the TP group's collectives are ops of the graph, and
what differs between ranks (their weights, their first vocabulary row) is a weight.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import NeuronConfig, Qwen2Shape
from ..model.graphs import BucketGraph
from ..model.kv_cache import KVState
from ..model.parallel import TPGroup, VocabParallelEmbedding, embed_owned
from ..model.qwen2 import Qwen2Decoder


class SPMDEmbedding(nn.Module):
    """VocabParallelEmbedding with its first vocabulary row a per-rank weight, not a Python constant, so that
    one graph serves every rank (an int32 [1] tensor, as NxD's SPMDRank keeps a rank)."""

    def __init__(self, embedding: VocabParallelEmbedding):
        super().__init__()
        self.tp, self.weight = embedding.tp, embedding.weight  # the same Parameter: tied lm_head stays tied
        self.start = nn.Parameter(torch.tensor([embedding.start], dtype=torch.int32), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(embed_owned(ids, self.start, self.weight))


def state_decoder(shape: Qwen2Shape, config: NeuronConfig, tp: TPGroup) -> Qwen2Decoder:
    """Rank 0's decoder as a compiler traces it: `tp`'s collectives, the per-rank embedding offset, the KV
    pool as state. With TP > 1, `tp` lowers its collectives to XLA's (NxD's group, or torch-xla's)."""
    decoder = Qwen2Decoder(shape, config, tp)
    if tp.size > 1:
        decoder.embed_tokens = SPMDEmbedding(decoder.embed_tokens)
    decoder.kv_cache = KVState(decoder.kv_cache)
    return decoder


def rank_weights(decoder: Qwen2Decoder) -> dict[str, torch.Tensor]:
    """One rank's weights, from its plain decoder, under the graph's parameter names: `decoder.` + the
    decoder's own, a tied embedding once (under the name tracing keeps for it, the first)."""
    weights = {f"decoder.{name}": p for name, p in decoder.named_parameters()}
    if decoder.tp.size > 1:
        weights["decoder.embed_tokens.start"] = torch.tensor([decoder.embed_tokens.start], dtype=torch.int32)
    return weights


class StatefulGraph(BucketGraph):
    """A bucket graph returning (result, *updated KV pool tensors).

    `route` is an input the graph ignores: NxD picks a graph by its input shapes alone, and a decode bucket's
    sampling and logits variants share every other shape, so the route's length names the bucket.
    """

    def forward(self, *inputs):
        """BucketGraph's inputs, then the route."""
        result = super().forward(*inputs[:-1])
        return (result, *self.decoder.kv_cache.take_updates())

    def aliases(self) -> dict[nn.Parameter, int]:
        """Each KV pool parameter -> the output that holds its update (NxD's input_output_aliases)."""
        return {cache: 1 + i for i, cache in enumerate(self.decoder.kv_cache.parameters())}


def route(bucket_index: int) -> torch.Tensor:
    """The `route` input of the `bucket_index`-th bucket."""
    return torch.zeros(bucket_index + 1, dtype=torch.int32)
