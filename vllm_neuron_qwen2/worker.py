"""vLLM worker for the Neuron decoder: one per process (one per TP rank on the cpu backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from . import active_backend, placement
from .platform import logger
from .runner import NeuronQwen2ModelRunner
from .vllm_model import NeuronQwen2ForVLLM

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.tasks import SupportedTask
    from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
    from vllm.v1.outputs import ModelRunnerOutput

# vLLM's block pool allocates the model's KV blocks: one spec over all layers, the model owns the tensors.
_KV_SPEC_NAME = "neuron_kv_blocks"


class NeuronQwen2Worker(WorkerBase):
    model: NeuronQwen2ForVLLM
    runner: NeuronQwen2ModelRunner

    def init_device(self) -> None:
        self.device = torch.device("cpu")
        pc = self.parallel_config
        # Before the model (and with it the Neuron runtime) loads: this DP rank's cores or thread share.
        placed = placement.place_this_rank(pc, active_backend())
        logger.info("DP rank %d, TP rank %d: %s", pc.data_parallel_index, self.rank, placed)
        # The cpu backend runs one process per TP rank (gloo); on Neuron the runtime spans the cores itself.
        world = pc.world_size if active_backend() == "cpu" else 1
        init_distributed_environment(
            world_size=world,
            rank=self.rank,
            distributed_init_method=self.distributed_init_method,
            local_rank=self.local_rank,
            backend="gloo",
        )
        ensure_model_parallel_initialized(world, 1)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        from vllm.model_executor.models import ModelRegistry

        model_cls, arch = ModelRegistry.resolve_model_cls(self.model_config.architectures, self.model_config)
        if not issubclass(model_cls, NeuronQwen2ForVLLM):
            raise RuntimeError(
                f"{arch} resolved to {model_cls.__name__}: the vllm.general_plugins entry point "
                "neuron_qwen2_models was not loaded (list it in VLLM_PLUGINS if you set that variable)"
            )
        self.model = model_cls(vllm_config=self.vllm_config)
        self.runner = NeuronQwen2ModelRunner(self.vllm_config, self.model)

    def get_model(self) -> NeuronQwen2ForVLLM:
        return self.model

    def get_supported_tasks(self) -> tuple[SupportedTask, ...]:
        return ("generate",)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        # One group whose page is one block's K and V over all layers of this rank, so that vLLM's
        # KV-cache log lines report the real size.
        decoder = self.model.decoder.decoder
        k0, _ = decoder.kv_cache.layer(0)  # [num_blocks * block_size, kv_heads, head_dim]
        return {
            _KV_SPEC_NAME: FullAttentionSpec(
                block_size=decoder.kv_cache.block_size,
                num_kv_heads=k0.shape[1] * decoder.shape.num_hidden_layers,
                head_size=k0.shape[2],
                dtype=k0.dtype,
            )
        }

    def get_supported_kv_cache_layouts(self) -> list[str]:
        # The default asks vLLM's attention backends, which this model does not use.
        return ["LBNHC"]

    def determine_available_memory(self) -> int:
        (spec,) = self.get_kv_cache_spec().values()
        return spec.page_size_bytes * self.model.neuron_config.num_blocks

    def initialize_from_config(self, kv_cache_config: KVCacheConfig) -> None:
        pool = self.model.neuron_config.num_blocks
        if kv_cache_config.num_blocks > pool:
            raise RuntimeError(f"vLLM allocated {kv_cache_config.num_blocks} KV blocks, the model has {pool}")

    def compile_or_warm_up_model(self) -> CompilationTimes:
        # Graphs are built (or loaded) by from_pretrained; nothing is left to compile here.
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        return self.runner.sample_tokens(grammar_output)

    def padding_stats(self) -> list[tuple[int, int, int, bool, int, int]]:
        """(rows, prompt tokens, context, sample, real tokens, padded tokens) per bucket run so far; the score
        graph (prompt logprobs) is the one with 0 rows.

        Plain values so that `LLM.collective_rpc("padding_stats")` can carry them (benchmarks/ reads them).
        """
        stats = self.model.decoder.padding
        return [(*bucket[:4], stats.real[bucket], stats.padded[bucket]) for bucket in stats.real]

    def step_stats(self) -> dict[str, float]:
        """Serving steps and their seconds in `execute_model`, and graph calls and their seconds: the
        difference is host work per step (planning, tensors, sampling bookkeeping)."""
        stats = self.model.decoder.padding
        return {
            "steps": self.runner.steps,
            "step_seconds": self.runner.step_seconds,
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
