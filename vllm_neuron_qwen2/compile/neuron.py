"""neuron backend: the bucket graphs (compile/stateful.py) compiled by neuronx-distributed's ModelBuilder.

One process drives all `tp_degree` NeuronCores: ModelBuilder traces rank 0's graphs once each, SPMD, as the
buckets of one key, and every rank gets its own pre-sharded weights at load. The KV pool is device state:
each graph returns its updated pool tensors as outputs aliased to them.

Written against neuronx-distributed (NxD Core) and torch-neuronx of Neuron SDK 2.31 (NxD 0.19.28492,
torch-neuronx 2.9.0.2.15.32035); NxD's source is public up to SDK 2.29 (NxD 0.18, github.com/aws-neuron/
neuronx-distributed at fbac349 "Release 2.29"), and its 2.30 and 2.31 release notes list no API change. The
comments cite that source (`src/neuronx_distributed/...`). Nothing here has run on Neuron hardware.
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
from tqdm import tqdm

from ..config import ConfigError, NeuronConfig, Qwen2Shape
from ..model.graphs import example_inputs
from ..model.parallel import TPGroup
from ..model.qwen2 import Qwen2Decoder
from ..placement import visible_cores
from ..vllm_compat import installed_stack, supported_pairs
from . import artifacts
from .buckets import Bucket
from .stateful import StatefulGraph, rank_weights, route, state_decoder

INSTALL_HINT = (
    "pip install 'vllm-neuron-qwen2[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com "
    "on a Neuron instance (inf2, trn1) with Neuron SDK 2.31"
)
# Physical NeuronCores per logical one: 1 on inf2 and trn1; trn2 defaults to 2, so the compiler,
# ModelBuilder and the runtime are all held to 1.
LNC = 1
LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"
# The neuronx-cc flags NxD Inference compiles Qwen2 with (its models/qwen2/modeling_qwen2.py
# get_compiler_args), and the logical core size, which NxDI passes on every target (models/model_wrapper.py).
COMPILER_ARGS = (
    "--enable-saturate-infinity --enable-mixed-precision-accumulation --auto-cast=none "
    "--model-type transformer -O1 --tensorizer-options='--enable-ccop-compute-overlap "
    "--cc-pipeline-tiling-factor=2 --vectorize-strided-dma' "
    f"--internal-hlo2tensorizer-options='--verify-hlo=true' --lnc={LNC}"
)
MODEL_FILE = "model.pt"
KEY = "qwen2"  # one ModelBuilder key whose buckets are our buckets; also a file name in the workdir


def require_neuron() -> None:
    """Fail with how to install torch-neuronx and neuronx-distributed when they are missing."""
    try:
        import neuronx_distributed.trace.model_builder  # noqa: F401
        import torch_neuronx  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"backend 'neuron' needs torch-neuronx and neuronx-distributed ({e}); installed: "
            f"{installed_stack()}. Supported: {supported_pairs()}. Install them with {INSTALL_HINT}, or use "
            "the cpu backend (VLLM_NEURON_QWEN2_BACKEND=cpu)."
        ) from e


def check_cores(tp_degree: int) -> None:
    cores = visible_cores()
    if cores is not None and len(cores) < tp_degree:
        raise ConfigError(
            f"neuron_config.tp_degree: {tp_degree} NeuronCores are needed, but NEURON_RT_VISIBLE_CORES="
            f"{os.environ['NEURON_RT_VISIBLE_CORES']} grants {len(cores)}; "
            "widen it or lower --tensor-parallel-size"
        )


def check_logical_cores() -> None:
    """Hold the runtime to the logical core size the graphs are compiled for (set before it starts)."""
    given = os.environ.setdefault(LNC_ENV, str(LNC))
    if given != str(LNC):
        raise ConfigError(
            f"{LNC_ENV}={given}: the graphs are compiled for {LNC} physical NeuronCore per logical core; "
            f"unset {LNC_ENV} or set it to {LNC}"
        )


@dataclass(frozen=True)
class NxDGroup(TPGroup):
    """TP collectives as NxD lowers them, so the traced graph runs on every rank (SPMD)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        # parallel_layers/mappings.py: the sum over the TP group (xm.all_reduce), identity at size 1
        from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(x)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        # parallel_layers/mappings.py: gathers along the last dimension, rank-major
        from neuronx_distributed.parallel_layers.mappings import gather_from_tensor_model_parallel_region

        return gather_from_tensor_model_parallel_region(x)


def hot_bucket(buckets: list[Bucket]) -> int:
    """The decode bucket of the most rows (sampling in the graph, if any does): the one steps mostly run."""
    decode = [b for b in buckets if b.kind == "decode"]
    return buckets.index(max(decode, key=lambda b: (b.rows, b.context, b.sample)))


def compile_graphs(folder: Path, shape: Qwen2Shape, config: NeuronConfig, buckets: list[Bucket]) -> None:
    """Trace every bucket as a bucket of one ModelBuilder key and save the multi-graph model in `folder`."""
    # trace/model_builder.py: ModelBuilder, and BaseModelInstance(module_cls, input_output_aliases) whose
    # load_module() builds self.module once per key and whose get(bucket_rank) gives each bucket's module and
    # {parameter: output index} aliases
    from neuronx_distributed.trace.model_builder import BaseModelInstance, ModelBuilder

    class Instance(BaseModelInstance):
        def get(self, bucket_rank: int, **kwargs: Any) -> tuple[StatefulGraph, dict]:
            graph = StatefulGraph(self.module, buckets[bucket_rank])
            return graph, graph.aliases()

    def decoder() -> Qwen2Decoder:
        # Built inside trace(), after it set up NxD's parallel state (parallel_layers/parallel_state.py)
        tp = TPGroup()
        if config.tp_degree > 1:
            from neuronx_distributed.parallel_layers import parallel_state

            tp = NxDGroup(0, config.tp_degree, parallel_state.get_tensor_model_parallel_group())
        return state_decoder(shape, config, tp)

    builder = ModelBuilder(
        router=None,  # unused: the runtime picks a bucket by its inputs' shapes (trace/spmd.py)
        tp_degree=config.tp_degree,
        checkpoint_loader=dict,  # never called: weights are sharded by `rank_weights`, not traced in
        compiler_workdir=str(folder / "workdir"),
        logical_nc_config=LNC,
    )
    builder.add(
        key=KEY,
        model_instance=Instance(decoder, input_output_aliases={}),
        # one tuple per bucket: the buckets of one key share one module, so its weights stay bound to it
        example_inputs=[
            (*example_inputs(b, config.block_size, shape.vocab_size), route(i)) for i, b in enumerate(buckets)
        ],
        compiler_args=COMPILER_ARGS,
        priority_model_idx=hot_bucket(buckets),  # weights laid out for the hot decode graph
    )
    # trace(initialize_model_weights=False): graphs only; weights come at load (nxd_model.initialize)
    torch.jit.save(builder.trace(initialize_model_weights=False), str(folder / MODEL_FILE))
    shutil.rmtree(folder / "workdir", ignore_errors=True)


class NeuronGraph:
    """Calls the multi-graph model with one bucket's route; the model returns the graph's result alone
    (aliased outputs stay on the device)."""

    def __init__(self, model: Any, route: torch.Tensor):
        self.model, self.route = model, route

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs, self.route)
        return out[0] if isinstance(out, (list, tuple)) else out


def build_neuron_graphs(
    decoder: Qwen2Decoder, config: NeuronConfig, buckets: list[Bucket], model_dir: Path
) -> dict[Bucket, Callable]:
    """Load (or first compile) the graphs and put every rank's weights on its NeuronCore.

    `decoder` is rank 0's shard; the other ranks' shards are loaded here, from the same `model_dir`.
    """
    require_neuron()
    check_cores(config.tp_degree)
    check_logical_cores()
    folder, _ = artifacts.prepare(
        config,
        model_dir,
        functools.partial(compile_graphs, shape=decoder.shape, config=config, buckets=buckets),
        decoder.tp,
    )
    weights = [rank_weights(decoder)]
    for rank in range(1, config.tp_degree):
        shard = Qwen2Decoder(decoder.shape, config, TPGroup(rank=rank, size=config.tp_degree))
        artifacts.load_weights(shard, model_dir, progress=False)
        weights.append(rank_weights(shard))
    model = torch.jit.load(str(folder / MODEL_FILE))  # torch_neuronx, imported above, registers its classes
    # trace/spmd.py: one dict per rank, keyed by the traced module's parameter names; the start rank is the
    # first of NEURON_RT_VISIBLE_CORES (a logical rank)
    model.nxd_model.initialize(weights, torch.tensor([0], dtype=torch.int32))
    graphs = {bucket: NeuronGraph(model, route(i)) for i, bucket in enumerate(buckets)}
    for bucket in tqdm(buckets, desc="loading bucket graphs onto the NeuronCores", unit="graph"):
        # writes only into the padding block
        graphs[bucket](*example_inputs(bucket, config.block_size, decoder.shape.vocab_size))
    return graphs
