"""neuron backend: the bucket graphs compiled by neuronx-distributed's ModelBuilder as one multi-graph model.

Written against the public APIs of torch-neuronx 2.x and neuronx-distributed the way NxD Inference uses
them; it has not run on Neuron hardware in this repository's CI. One process drives all `tp_degree`
NeuronCores: every bucket is traced once (SPMD) as its own key, all keys share one set of weight names, and
each rank gets its own pre-sharded weights. The KV cache is device state: each graph returns the caches it
updated in place as outputs aliased to their inputs, so they stay on the device between calls.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, NeuronConfig, Qwen2Shape
from ..model.graphs import BucketGraph, example_inputs
from ..model.parallel import TPGroup, VocabParallelEmbedding, embed_owned
from ..model.qwen2 import Qwen2Decoder
from ..placement import visible_cores
from . import artifacts
from .buckets import Bucket

INSTALL_HINT = (
    "pip install 'vllm-neuron-qwen2[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com "
    "on a Neuron instance (trn1, trn2, inf2)"
)
# The neuronx-cc flags NxD Inference compiles Qwen2 with (its Qwen2 get_compiler_args).
COMPILER_ARGS = (
    "--enable-saturate-infinity --enable-mixed-precision-accumulation --auto-cast=none "
    "--model-type transformer -O1 --tensorizer-options='--enable-ccop-compute-overlap "
    "--cc-pipeline-tiling-factor=2 --vectorize-strided-dma' "
    "--internal-hlo2tensorizer-options='--verify-hlo=true'"
)
MODEL_FILE = "model.pt"


def require_neuron() -> None:
    """Fail with how to install torch-neuronx and neuronx-distributed when they are missing."""
    try:
        import neuronx_distributed.trace.model_builder  # noqa: F401
        import torch_neuronx  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"backend 'neuron' needs torch-neuronx and neuronx-distributed ({e}). Install them with "
            f"{INSTALL_HINT}, or use the cpu backend (VLLM_NEURON_QWEN2_BACKEND=cpu)."
        ) from e


def check_cores(tp_degree: int) -> None:
    cores = visible_cores()
    if cores is not None and len(cores) < tp_degree:
        raise ConfigError(
            f"neuron_config.tp_degree: {tp_degree} NeuronCores are needed, but NEURON_RT_VISIBLE_CORES="
            f"{os.environ['NEURON_RT_VISIBLE_CORES']} grants {len(cores)}; "
            "widen it or lower --tensor-parallel-size"
        )


@dataclass(frozen=True)
class NxDGroup(TPGroup):
    """TP collectives as neuronx-distributed lowers them, so the traced graph runs on every rank (SPMD)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(x)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        from neuronx_distributed.parallel_layers.mappings import gather_from_tensor_model_parallel_region

        return gather_from_tensor_model_parallel_region(x)


class SPMDEmbedding(nn.Module):
    """VocabParallelEmbedding with its first vocabulary row as a per-rank weight instead of a Python constant,
    so that one traced graph serves every rank."""

    def __init__(self, embedding: VocabParallelEmbedding):
        super().__init__()
        self.tp, self.weight = embedding.tp, embedding.weight  # the same Parameter: tied lm_head stays tied
        self.start = nn.Parameter(torch.tensor(embedding.start), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(embed_owned(ids, self.start, self.weight))


class StatefulGraph(BucketGraph):
    """A bucket graph returning (result, *KV caches), each cache an output aliased to the same input state.

    `route` is an extra input the graph ignores: NxD picks a graph by input shapes alone, and a decode
    bucket's sampling and logits variants share all other shapes, so its length names the bucket.
    """

    def forward(self, input_ids, position_ids, slot_mapping, block_tables, logit_index, sampling, route):
        result = super().forward(input_ids, position_ids, slot_mapping, block_tables, logit_index, sampling)
        return (result, *self.caches())

    def caches(self) -> list[nn.Parameter]:
        return list(self.decoder.kv_cache.parameters())

    def aliases(self) -> dict[nn.Parameter, int]:
        return {cache: 1 + i for i, cache in enumerate(self.caches())}


def _route(i: int) -> torch.Tensor:
    return torch.zeros(i + 1, dtype=torch.int32)


def traced_decoder(shape: Qwen2Shape, config: NeuronConfig) -> Qwen2Decoder:
    """Rank 0's decoder as traced: NxD collectives, per-rank embedding offset, KV cache as device state."""
    tp = TPGroup()
    if config.tp_degree > 1:
        from neuronx_distributed.parallel_layers import parallel_state

        tp = NxDGroup(0, config.tp_degree, parallel_state.get_tensor_model_parallel_group())
    decoder = Qwen2Decoder(shape, config, tp)
    if config.tp_degree > 1:
        decoder.embed_tokens = SPMDEmbedding(decoder.embed_tokens)
    cache = decoder.kv_cache
    for name, buffer in list(cache.named_buffers(recurse=False)):
        # NxD keeps aliased parameters on the device as state, allocated there, never loaded as weights.
        delattr(cache, name)
        cache.register_parameter(name, nn.Parameter(buffer, requires_grad=False))
    return decoder


def rank_weights(decoder: Qwen2Decoder) -> dict[str, torch.Tensor]:
    """One rank's weights under the traced graph's parameter names (KV state excluded)."""
    weights = {f"decoder.{name}": t for name, t in decoder.state_dict().items()}
    if decoder.tp.size > 1:
        weights["decoder.embed_tokens.start"] = torch.tensor(decoder.embed_tokens.start)
    return weights


def compile_graphs(folder: Path, shape: Qwen2Shape, config: NeuronConfig, buckets: list[Bucket]) -> None:
    """Trace every bucket as its own key of one ModelBuilder and save the multi-graph model in `folder`."""
    from neuronx_distributed.trace.model_builder import BaseModelInstance, ModelBuilder

    class Instance(BaseModelInstance):
        def get(self, bucket_rank: int, **kwargs: Any) -> tuple[nn.Module, dict[nn.Parameter, int]]:
            return self.module, self.module.aliases()

    decoder = functools.cache(lambda: traced_decoder(shape, config))  # built inside NxD's parallel context
    builder = ModelBuilder(
        router=None,
        tp_degree=config.tp_degree,
        checkpoint_loader=dict,  # unused: weights are sharded by `rank_weights`, not by NxD
        compiler_workdir=str(folder / "workdir"),
    )
    for i, bucket in enumerate(buckets):
        builder.add(
            key=str(bucket),
            model_instance=Instance(lambda b=bucket: StatefulGraph(decoder(), b), input_output_aliases={}),
            example_inputs=[(*example_inputs(bucket, config.block_size), _route(i))],
            compiler_args=COMPILER_ARGS,
            priority_model_idx=0 if i == 0 else None,  # weight layout tuned for the hot decode graph
        )
    torch.jit.save(builder.trace(initialize_model_weights=False), str(folder / MODEL_FILE))
    shutil.rmtree(folder / "workdir", ignore_errors=True)


class NeuronGraph:
    """Calls the multi-graph model with the route of one bucket; returns the graph's result alone."""

    def __init__(self, model: Any, route: torch.Tensor):
        self.model, self.route = model, route

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs, self.route)
        return out[0] if isinstance(out, (list, tuple)) else out  # aliased cache outputs are not returned


def build_neuron_graphs(
    decoder: Qwen2Decoder, config: NeuronConfig, buckets: list[Bucket], model_dir: Path
) -> dict[Bucket, Callable]:
    """Load (or first compile) the graphs and put every rank's weights on its NeuronCore.

    `decoder` is rank 0's shard; the other ranks' shards are loaded here, from the same `model_dir`.
    """
    require_neuron()
    check_cores(config.tp_degree)
    folder, _ = artifacts.prepare(
        config, model_dir, lambda tmp: compile_graphs(tmp, decoder.shape, config, buckets), decoder.tp
    )
    weights = [rank_weights(decoder)]
    for rank in range(1, config.tp_degree):
        shard = Qwen2Decoder(decoder.shape, config, TPGroup(rank=rank, size=config.tp_degree))
        artifacts.load_weights(shard, model_dir, progress=False)
        weights.append(rank_weights(shard))
    model = torch.jit.load(str(folder / MODEL_FILE))
    # Rank numbering starts at the first core NEURON_RT_VISIBLE_CORES grants.
    model.nxd_model.initialize(weights, torch.tensor([0], dtype=torch.int32))
    return {bucket: NeuronGraph(model, _route(i)) for i, bucket in enumerate(buckets)}
