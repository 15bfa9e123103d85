"""Backends turn the decoder and the bucket list into callable graphs sharing its weights and KV cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import NeuronConfig
from ..model.qwen2 import Qwen2Decoder
from .buckets import Bucket
from .cpu import build_cpu_graphs


def build_graphs(
    decoder: Qwen2Decoder, config: NeuronConfig, buckets: list[Bucket], model_dir: Path
) -> dict[Bucket, Callable]:
    """One callable per bucket, taking BucketGraph's inputs. Compiled graphs are loaded from their
    artifact folder, or compiled into it first (see `artifacts.prepare`)."""
    if config.backend == "neuron":
        from .neuron import build_neuron_graphs  # torch-neuronx is imported only on this path

        return build_neuron_graphs(decoder, config, buckets, model_dir)
    return build_cpu_graphs(decoder, config, buckets, model_dir)
