"""A vLLM plugin for tests: the neuron backend with NxD's compiler replaced by the cpu backend's graphs.

All else is the neuron backend's path: one process drives every NeuronCore of a replica (through
NEURON_RT_VISIBLE_CORES), and under Ray the other TP ranks only hold their cores. That path can thus run
without Neuron hardware. tests/test_scale_out.py loads it through a `vllm.general_plugins` entry point.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from vllm_neuron_qwen2.compile.buckets import Bucket
from vllm_neuron_qwen2.config import NeuronConfig
from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder

logger = logging.getLogger("vllm.neuron_on_cpu")


def register() -> None:
    from vllm_neuron_qwen2.compile import neuron

    neuron.build_neuron_graphs = build_on_cpu


def build_on_cpu(
    decoder: Qwen2Decoder, config: NeuronConfig, buckets: list[Bucket], model_dir: Path
) -> dict[Bucket, Callable]:
    """Where NxD would run `decoder`'s TP group as SPMD over the visible cores, run the whole model (TP 1)."""
    from vllm_neuron_qwen2.compile import artifacts, neuron
    from vllm_neuron_qwen2.compile.cpu import build_cpu_graphs
    from vllm_neuron_qwen2.model.parallel import TPGroup

    neuron.check_cores(config.tp_degree)
    logger.warning(
        "neuron-on-cpu: process %d drives the TP %d replica on NEURON_RT_VISIBLE_CORES=%s",
        os.getpid(), config.tp_degree, os.environ.get("NEURON_RT_VISIBLE_CORES"),
    )  # fmt: skip
    whole_config = dataclasses.replace(config, tp_degree=1, backend="cpu")
    whole = Qwen2Decoder(decoder.shape, whole_config, TPGroup())
    artifacts.load_weights(whole, model_dir, progress=False)
    return build_cpu_graphs(whole.eval(), whole_config, buckets, model_dir)
