"""The neuron backend's graphs (compile/stateful.py) run by torch-xla, with no ModelBuilder.

XLA is what torch-neuronx compiles from: here the graphs run on torch-xla's CPU device (PJRT_DEVICE=CPU), on
a Neuron host on a NeuronCore (torch-neuronx's XLA device), unchanged. torch-xla traces each bucket graph
lazily, compiles it at its first call and reuses the program afterwards. The weights and the KV pool live on
the device; a step copies each returned pool update onto its pool tensor, which torch-xla turns into an
update in place (the program's output aliased to its input buffer), as NxD's input_output_aliases do.

TP > 1 uses `XlaGroup`, which lowers the collectives to the XLA ops NxD's mappings emit (an all-reduce, and
an all-gather along the last dimension, over the TP group's replicas).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

# torch-xla's CPU device where no NeuronCore is; on a Neuron host torch-neuronx picks the NeuronCore.
if not glob.glob("/dev/neuron*"):
    os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("NEURON_CC_FLAGS", "--auto-cast=none")  # float32 stays float32 on a NeuronCore

import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as metrics  # noqa: E402

from vllm_neuron_qwen2.compile.buckets import all_buckets  # noqa: E402
from vllm_neuron_qwen2.compile.stateful import StatefulGraph, route, state_decoder  # noqa: E402
from vllm_neuron_qwen2.config import NeuronConfig, Qwen2Shape  # noqa: E402
from vllm_neuron_qwen2.model.checkpoint import load_checkpoint  # noqa: E402
from vllm_neuron_qwen2.model.parallel import TPGroup  # noqa: E402
from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder  # noqa: E402
from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM  # noqa: E402


@dataclass(frozen=True)
class XlaGroup(TPGroup):
    """TP collectives as torch-xla ops over replicas 0 .. size-1 (what NxD's mappings lower to)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return xm.all_reduce(xm.REDUCE_SUM, x, groups=[list(range(self.size))])

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return xm.all_gather(x, dim=-1, groups=[list(range(self.size))], pin_layout=False)


class XlaGraph:
    """One bucket's StatefulGraph on the XLA device: inputs in, the pool updated in place, the result out."""

    def __init__(self, graph: StatefulGraph, bucket_route: torch.Tensor, device: torch.device):
        self.graph, self.device = graph, device
        self.route = bucket_route.to(device)
        self.pool = list(graph.decoder.kv_cache.parameters())

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            result, *updates = self.graph(*(t.to(self.device) for t in inputs), self.route)
            for tensor, update in zip(self.pool, updates, strict=True):
                tensor.copy_(update)
            del updates  # only the pool holds the updates: the program aliases them to its buffers
            torch_xla.sync()
            return result.cpu()


def load(model_dir: Path, config: NeuronConfig) -> NeuronQwen2ForCausalLM:
    """The standalone API over the neuron backend's graphs on torch-xla's device (TP 1)."""
    shape = Qwen2Shape.from_pretrained(model_dir)
    config = config.resolve(shape)
    plain = Qwen2Decoder(shape, config, TPGroup())
    load_checkpoint(plain, model_dir, progress=False)
    decoder = state_decoder(shape, config, TPGroup())
    decoder.load_state_dict(plain.state_dict(), strict=False)  # the KV pool is state, not a weight
    device = torch_xla.device()
    decoder.to(device)
    buckets = all_buckets(config)
    graphs = {b: XlaGraph(StatefulGraph(decoder, b), route(i), device) for i, b in enumerate(buckets)}
    return NeuronQwen2ForCausalLM(decoder, config, graphs)


def compilations() -> int:
    """Programs torch-xla has compiled in this process so far."""
    data = metrics.metric_data("CompileTime")
    return data[0] if data else 0


def host_transfers() -> int:
    """Device-to-host transfers so far."""
    data = metrics.metric_data("TransferFromDeviceTime")
    return data[0] if data else 0


def last_aliases() -> int:
    """Buffers the last program run aliased from its inputs to its outputs (its alias table)."""
    return int(metrics.metric_data("InputOutputAliasCount")[2][-1][1])
