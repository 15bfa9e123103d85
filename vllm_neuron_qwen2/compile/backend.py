"""Backends turn the decoder and the bucket list into callable graphs sharing its weights and KV cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import NeuronConfig
from ..model.graphs import BucketGraph
from ..model.qwen2 import Qwen2Decoder
from .buckets import Bucket


def build_graphs(
    decoder: Qwen2Decoder, config: NeuronConfig, buckets: list[Bucket], model_dir: Path
) -> dict[Bucket, Callable]:
    if config.backend == "neuron":
        from .neuron import build_neuron_graphs  # torch-neuronx is imported only on this path

        return build_neuron_graphs(decoder, config, buckets, model_dir)
    graphs = {b: BucketGraph(decoder, b) for b in buckets}
    if config.compile_mode == "compiled":
        graphs = {b: torch.compile(g, fullgraph=True, dynamic=False) for b, g in graphs.items()}
    return graphs
