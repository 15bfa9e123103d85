"""vLLM worker for the Neuron decoder: one per process the executor starts.

On the cpu backend every TP rank is a worker holding its shard (gloo collectives). On Neuron the runtime runs
TP itself: one worker, rank 0, drives all of a replica's NeuronCores. vLLM's Ray executor still starts one
worker per TP rank, each on one `neuron_cores` unit Ray reserved; rank 0 drives the cores reserved for all
of them and the other ranks only hold their reservation (no model, no runtime, nothing to return).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec
from vllm.v1.worker.worker_base import WorkerBase

from . import active_backend, placement, vllm_compat
from .config import NeuronConfig, Qwen2Shape
from .model.parallel import TPGroup
from .model.qwen2 import Qwen2Decoder
from .platform import logger, served_neuron_config
from .runner import NeuronQwen2ModelRunner
from .vllm_model import NeuronQwen2ForVLLM

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.tasks import SupportedTask
    from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
    from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput

# vLLM's block pool allocates the model's KV blocks: one spec over all layers, the model owns the tensors.
_KV_SPEC_NAME = "neuron_kv_blocks"


class CoreHolderRunner:
    """The runner of a rank that only holds its NeuronCore for rank 0: vLLM reads rank 0's outputs alone."""

    def execute_model(self, scheduler_output: SchedulerOutput, intermediate_tensors: None = None) -> None:
        return None

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> None:
        return None

    def take_draft_token_ids(self) -> None:
        return None


class NeuronQwen2Worker(WorkerBase):
    # None on a rank that only holds its NeuronCore for rank 0 (holds_core_only).
    model: NeuronQwen2ForVLLM | None
    # vLLM's name: vLLM 0.16's Ray workers call `worker.model_runner` directly.
    model_runner: NeuronQwen2ModelRunner | CoreHolderRunner
    # This rank's shard (rank 0's on the meta device for a core holder): what its KV blocks look like.
    shard: Qwen2Decoder
    neuron_config: NeuronConfig

    def init_device(self) -> None:
        self.device = torch.device("cpu")
        pc = self.parallel_config
        self.holds_core_only = active_backend() == "neuron" and self.rank > 0
        if self.holds_core_only:
            logger.info(
                "DP rank %d, TP rank %d: holds NeuronCore %d for TP rank 0, which drives the replica's cores",
                pc.data_parallel_index, self.rank, vllm_compat.assigned_cores(pc)[self.local_rank],
            )  # fmt: skip
        else:
            # Before the model (and with it the Neuron runtime) loads: this DP rank's cores or thread share.
            placed = placement.place_this_rank(pc, active_backend())
            logger.info("DP rank %d, TP rank %d: %s", pc.data_parallel_index, self.rank, placed)
        # A group over the executor's processes: the cpu backend's TP collectives run on it.
        world = 1 if pc.distributed_executor_backend == "uni" else pc.world_size
        init_distributed_environment(
            world_size=world,
            rank=self.rank,
            distributed_init_method=self.distributed_init_method,
            local_rank=self.local_rank,
            backend="gloo",
        )
        ensure_model_parallel_initialized(world, 1)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        if self.holds_core_only:
            self.model, self.model_runner = None, CoreHolderRunner()
            self.neuron_config = served_neuron_config(self.vllm_config)
            shape = Qwen2Shape.from_dict(self.model_config.hf_config.to_dict())
            with torch.device("meta"):  # shapes without memory
                self.shard = Qwen2Decoder(
                    shape, self.neuron_config, TPGroup(size=self.neuron_config.tp_degree)
                )
            return
        from vllm.model_executor.models import ModelRegistry

        model_cls, arch = ModelRegistry.resolve_model_cls(self.model_config.architectures, self.model_config)
        if not issubclass(model_cls, NeuronQwen2ForVLLM):
            raise RuntimeError(
                f"{arch} resolved to {model_cls.__name__}: the vllm.general_plugins entry point "
                "neuron_qwen2_models was not loaded (list it in VLLM_PLUGINS if you set that variable)"
            )
        self.model = model_cls(vllm_config=self.vllm_config)
        self.model_runner = NeuronQwen2ModelRunner(self.vllm_config, self.model)
        self.shard, self.neuron_config = self.model.decoder.decoder, self.model.neuron_config

    def get_model(self) -> NeuronQwen2ForVLLM | None:
        return self.model

    def get_supported_tasks(self) -> tuple[SupportedTask, ...]:
        return ("generate",)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        # One group whose page is one block's K and V over all layers of this rank, so that vLLM's
        # KV-cache log lines report the real size (a core holder reports the rank 0 shard's).
        kv_cache = self.shard.kv_cache
        k0, _ = kv_cache.layer(0)  # [num_blocks * block_size, kv_heads, head_dim]
        return {
            _KV_SPEC_NAME: FullAttentionSpec(
                block_size=kv_cache.block_size,
                num_kv_heads=k0.shape[1] * self.shard.shape.num_hidden_layers,
                head_size=k0.shape[2],
                dtype=k0.dtype,
            )
        }

    def get_supported_kv_cache_layouts(self) -> list[str]:
        # The default asks vLLM's attention backends, which this model does not use.
        return ["LBNHC"]

    def determine_available_memory(self) -> int:
        (spec,) = self.get_kv_cache_spec().values()
        return spec.page_size_bytes * self.neuron_config.num_blocks

    def initialize_from_config(self, kv_cache_config: KVCacheConfig) -> None:
        pool = self.neuron_config.num_blocks
        if kv_cache_config.num_blocks > pool:
            raise RuntimeError(f"vLLM allocated {kv_cache_config.num_blocks} KV blocks, the model has {pool}")

    def initialize_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        # vLLM 0.16 calls this after sizing the pool; the blocks were checked in initialize_from_config.
        pass

    def compile_or_warm_up_model(self) -> object:
        # Graphs are built (or loaded) by from_pretrained; nothing is left to compile here.
        return vllm_compat.no_compilation_times()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput | None:
        return self.model_runner.sample_tokens(grammar_output)

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        return self.model_runner.take_draft_token_ids()

    def padding_stats(self) -> list[tuple[int, int, int, bool, int, bool, int, int, int, float]]:
        """(rows, prompt tokens, context, sample, tokens per row, packs, real tokens, padded tokens, calls,
        seconds) per bucket run so far; the score graph (prompt logprobs) is the one with 0 rows, verify
        graphs have several tokens per row, packing prefill graphs key room for several sequences' chunks.

        Plain values so that `LLM.collective_rpc("padding_stats")` can carry them (benchmarks/ reads them).
        """
        if self.holds_core_only:
            return []
        stats = self.model.decoder.padding
        return [
            (
                *bucket[:4],
                bucket.row_tokens,
                bucket.packs,
                stats.real[bucket],
                stats.padded[bucket],
                stats.calls[bucket],
                stats.seconds[bucket],
            )
            for bucket in stats.real
        ]

    def step_stats(self) -> dict[str, float]:
        """Serving steps and their seconds in `execute_model` and `sample_tokens`, and graph calls and their
        seconds: the difference is host work per step (planning, tensors, sampling bookkeeping)."""
        if self.holds_core_only:
            return {}
        stats = self.model.decoder.padding
        return {
            "steps": self.model_runner.steps,
            "step_seconds": self.model_runner.step_seconds,
            "graph_calls": stats.graph_calls,
            "graph_seconds": stats.graph_seconds,
        }

    def add_lora(self, lora_request: LoRARequest) -> bool:
        raise ValueError("LoRA is not supported by vllm-neuron-qwen2")

    def remove_lora(self, lora_id: int) -> bool:
        return False

    def pin_lora(self, lora_id: int) -> bool:
        return False

    def list_loras(self) -> set[int]:
        return set()
