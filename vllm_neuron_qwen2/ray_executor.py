"""Ray: vLLM's own Ray executor, scheduled on NeuronCores, with the cluster checked before it waits on them.

vLLM places one Ray actor per TP rank, each on one unit of the platform's `ray_device_key`, `neuron_cores`,
which Ray detects on Neuron hosts (on Neuron, TP rank 0 drives them all; see worker.py). The cpu backend
runs each TP rank as its own gloo process, so a Ray cluster it starts itself declares one stand-in
`neuron_cores` per CPU; a cluster started by hand for the cpu backend declares them with
`ray start --resources '{"neuron_cores": N}'`. vLLM would wait half an hour for cores a cluster does not
have; this fails at once instead. Imported only when Ray is asked for.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import active_backend
from .config import ConfigError
from .platform import NeuronQwen2Platform
from .vllm_compat import available_cpu_count, ray_executor_base

try:
    import ray

    RayExecutor = ray_executor_base()
except ImportError as e:
    raise ImportError(
        f"the Ray executor needs ray ({e}); install it with pip install 'vllm-neuron-qwen2[ray]'"
    ) from e

if TYPE_CHECKING:
    from vllm.config import ParallelConfig

NEURON_CORES = NeuronQwen2Platform.ray_device_key


def join_ray_cluster(parallel_config: ParallelConfig, needed_cores: int, asked_by: str) -> None:
    """Connect to the Ray cluster (RAY_ADDRESS, or one started here) and fail, naming `asked_by` and both
    numbers, when it has fewer than `needed_cores` NeuronCores."""
    if not ray.is_initialized():
        own_cluster = active_backend() == "cpu" and not os.environ.get("RAY_ADDRESS")
        ray.init(
            resources={NEURON_CORES: available_cpu_count()} if own_cluster else None,
            runtime_env=parallel_config.ray_runtime_env,
        )
    have = int(ray.cluster_resources().get(NEURON_CORES, 0))
    if have < needed_cores:
        raise ConfigError(
            f"{asked_by} needs {needed_cores} {NEURON_CORES} in the Ray cluster, which has {have}: start Ray "
            f"on Neuron hosts (Ray detects their cores), or, for the cpu backend, declare stand-ins with "
            f"ray start --resources '{{\"{NEURON_CORES}\": {needed_cores}}}'"
        )


class NeuronRayExecutor(RayExecutor):
    """vLLM's Ray executor, started once the cluster is known to have the TP ranks' NeuronCores."""

    def _init_executor(self) -> None:
        tp = self.parallel_config.world_size
        join_ray_cluster(self.parallel_config, tp, f"--distributed-executor-backend ray with TP {tp}")
        super()._init_executor()
