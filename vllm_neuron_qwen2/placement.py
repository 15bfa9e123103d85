"""Where each data-parallel rank runs: its own NeuronCores (neuron) or its share of the host's CPUs (cpu).

vLLM 0.32 starts one engine core process per DP rank (dense models: independent engines, no collectives).
Before it starts local DP rank r, it sets `parallel_config.assigned_physical_gpu_ids` to
`Platform.device_id_to_physical_device_id(i)` for i in r*T .. r*T+T-1 (T: the TP size), and leaves
NEURON_RT_VISIBLE_CORES as it is. So the platform maps logical core i to the i-th core NEURON_RT_VISIBLE_CORES
lists (all cores, in order, when it is unset), and each rank's worker narrows NEURON_RT_VISIBLE_CORES to its
own cores in its own process, before the Neuron runtime starts (torch-neuronx is imported at model load).
Every rank loads the same compiled folder; `artifacts.prepare` lets one process build a missing one.

On the cpu backend the engine cores (and their TP workers) of one host share its CPUs: the platform
records how many rank processes this host runs, and each takes cores // (D_local * T) torch threads.

Under Ray (one actor per TP rank) vLLM sets `assigned_physical_gpu_ids` to the cores Ray reserved for all
of a replica's ranks on the host, so on Neuron TP rank 0, which drives them all, narrows to exactly those.

vLLM 0.16 has no `assigned_physical_gpu_ids`: it narrows NEURON_RT_VISIBLE_CORES itself, for each DP rank's
process (through `device_id_to_physical_device_id`) and for each Ray worker (all of the cores Ray reserved on
its host), so the rank's cores are those it was given (vllm_compat.assigned_cores).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .config import ConfigError
from .vllm_compat import assigned_cores, available_cpu_count

if TYPE_CHECKING:
    from vllm.config import ParallelConfig

VISIBLE_CORES_ENV = "NEURON_RT_VISIBLE_CORES"
# Rank processes on this host (local DP ranks x TP), set by the platform before vLLM spawns them.
HOST_RANKS_ENV = "VLLM_NEURON_QWEN2_HOST_RANKS"
# A NeuronCore's memory in GiB (inf2 and trn1: 32 GiB per chip of two cores).
CORE_MEMORY_ENV = "VLLM_NEURON_QWEN2_CORE_MEMORY_GIB"
DEFAULT_CORE_MEMORY_GIB = 16.0
# OMP_NUM_THREADS as the user set it ("" when unset), recorded before vLLM sets it for its own processes.
USER_THREADS_ENV = "VLLM_NEURON_QWEN2_USER_OMP_NUM_THREADS"


def parse_cores(spec: str) -> list[int]:
    """NeuronCore ids of a NEURON_RT_VISIBLE_CORES value: "0-3,8" -> [0, 1, 2, 3, 8]."""
    cores = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        cores += range(int(first), int(last or first) + 1)
    return cores


def format_cores(cores: list[int]) -> str:
    """The NEURON_RT_VISIBLE_CORES value of `cores`: consecutive ids as a range, [4, 5, 6] -> "4-6"."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][-1] + 1:
            runs[-1].append(core)
        else:
            runs.append([core])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def visible_cores() -> list[int] | None:
    """The NeuronCores NEURON_RT_VISIBLE_CORES grants, in order; None when it is unset (all cores)."""
    spec = os.environ.get(VISIBLE_CORES_ENV, "").strip()
    return parse_cores(spec) if spec else None


def physical_core(logical: int) -> int:
    """The NeuronCore behind this host's logical core `logical` (DP rank r gets r*T .. r*T+T-1)."""
    cores = visible_cores()
    return logical if cores is None else cores[logical]


def memory_per_rank(backend: str, tp: int) -> tuple[int, str]:
    """Device memory one rank may use, in bytes, and where the figure comes from: a NeuronCore's
    (VLLM_NEURON_QWEN2_CORE_MEMORY_GIB, default 16: inf2 and trn1), or on cpu the host's available memory
    shared by this host's rank processes."""
    if backend == "neuron":
        gib = float(os.environ.get(CORE_MEMORY_ENV, DEFAULT_CORE_MEMORY_GIB))
        return int(gib * (1 << 30)), f"one NeuronCore, {CORE_MEMORY_ENV}"
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    ranks = int(os.environ.get(HOST_RANKS_ENV, tp))
    return available // ranks, f"available host memory / {ranks} rank processes"


def check_core_budget(local_dp_ranks: int, tp: int) -> None:
    """Every local DP rank needs `tp` NeuronCores of its own; fails naming both numbers if they do not fit.

    With NEURON_RT_VISIBLE_CORES unset the runtime itself refuses cores the host does not have.
    """
    cores = visible_cores()
    needed = local_dp_ranks * tp
    if cores is not None and needed > len(cores):
        raise ConfigError(
            f"{local_dp_ranks} data-parallel ranks on this host (--data-parallel-size, or -local) x "
            f"--tensor-parallel-size {tp} need {needed} NeuronCores, but {VISIBLE_CORES_ENV}="
            f"{os.environ[VISIBLE_CORES_ENV]} grants {len(cores)}; lower them or widen {VISIBLE_CORES_ENV}"
        )


def rank_environment(assigned_cores: list[int] | None) -> dict[str, str]:
    """What a rank's process sets before the Neuron runtime starts: its own cores (none to set without DP)."""
    return {} if assigned_cores is None else {VISIBLE_CORES_ENV: format_cores(assigned_cores)}


def threads_per_rank(host_cpus: int, host_ranks: int) -> int:
    """Torch threads of each of `host_ranks` rank processes sharing `host_cpus` CPUs: none oversubscribed."""
    return max(1, host_cpus // host_ranks)


def keep_freed_memory() -> None:
    """For the processes vLLM starts next (glibc reads these at start): keep freed memory in the heap. A step
    allocates large tensors (gathered K/V, activations); glibc would map each afresh and unmap it when freed,
    and every first touch of a fresh page faults: gathering 33 MB of K/V took 19 ms instead of 4."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        os.environ.setdefault(name, str(2**31 - 1))


def remember_user_threads() -> None:
    """Record OMP_NUM_THREADS as the user set it, in the front end, before vLLM sets it for the processes it
    starts (vLLM 0.16 does not mark its own values); every rank process inherits the record."""
    os.environ.setdefault(USER_THREADS_ENV, os.environ.get("OMP_NUM_THREADS", ""))


def place_this_rank(parallel_config: ParallelConfig, backend: str) -> str:
    """Give this rank's process its cores (neuron) or its thread share (cpu); returns what it got, to log.

    An OMP_NUM_THREADS the user set is kept.
    """
    if backend == "neuron":
        cores, tp = assigned_cores(parallel_config), parallel_config.tensor_parallel_size
        if parallel_config.use_ray and cores is not None and len(cores) < tp:
            raise ConfigError(
                f"--tensor-parallel-size {tp} over Ray: TP rank 0 drives the replica's NeuronCores, but "
                f"Ray reserved only {len(cores)} of them on its host ({format_cores(cores)}); a replica's "
                "cores must be on one host (free them there, or lower --tensor-parallel-size)"
            )
        os.environ.update(rank_environment(cores))
        return f"NeuronCores {os.environ.get(VISIBLE_CORES_ENV, 'all')}"
    if os.environ.get(USER_THREADS_ENV):
        return f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS)"
    host_cpus = available_cpu_count()
    host_ranks = int(os.environ.get(HOST_RANKS_ENV, parallel_config.tensor_parallel_size))
    torch.set_num_threads(threads_per_rank(host_cpus, host_ranks))
    return f"{torch.get_num_threads()} torch threads ({host_cpus} CPUs, {host_ranks} rank processes here)"
