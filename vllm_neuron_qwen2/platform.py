"""The vLLM platform: maps vLLM's configuration onto the static-shape Neuron decoder."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.platforms.interface import Platform, PlatformEnum

from . import ARTIFACTS_ENV, BACKEND_ENV, active_backend, placement, vllm_compat
from .config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, MAX_SPECULATION_LENGTH

vllm_compat.check_installed_stack()

if TYPE_CHECKING:
    from vllm.config import ParallelConfig, VllmConfig
    from vllm.inputs import EngineInput
    from vllm.pooling_params import PoolingParams
    from vllm.sampling_params import SamplingParams
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from .config import NeuronConfig

# Under the "vllm" logger namespace so that vLLM's logging configuration (level, format) applies.
logger = init_logger("vllm.neuron_qwen2")

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)

# NeuronConfig fields that vLLM's own arguments set: field -> the option that owns it.
_DERIVED_FIELDS = {
    "batch_size": "--max-num-seqs",
    "seq_len": "--max-model-len",
    "tp_degree": "--tensor-parallel-size",
    "dtype": "--dtype",
    "backend": BACKEND_ENV,
    "block_size": "--block-size",
    "num_blocks": "--num-gpu-blocks-override",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "speculation_length": "--speculative-config num_speculative_tokens",
}
# vLLM's defaults when these options are not given: a step budget that one prefill graph covers, and
# as many sequences as a Neuron decode graph serves well (vLLM's own 256 would mean a 256-row ladder).
DEFAULT_MAX_NUM_SEQS = 8


def requested_neuron_config(vllm_config: VllmConfig) -> NeuronConfig:
    """What this engine asks of the decoder: vLLM's arguments plus `--additional-config` `neuron_config`."""
    from .config import NeuronConfig

    extra = (vllm_config.additional_config or {}).get("neuron_config") or {}
    if not isinstance(extra, dict):
        raise ValueError("--additional-config: 'neuron_config' must be a JSON object")
    sc, cc = vllm_config.scheduler_config, vllm_config.cache_config
    derived = {
        "batch_size": sc.max_num_seqs,
        "seq_len": vllm_config.model_config.max_model_len,
        "tp_degree": vllm_config.parallel_config.tensor_parallel_size,
        "dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),
        "backend": active_backend(),
        "block_size": cc.block_size,
        "num_blocks": cc.num_gpu_blocks_override,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "speculation_length": speculation_length(vllm_config),
    }
    for key, value in derived.items():
        if key in extra and extra[key] != value:
            raise ValueError(
                f"--additional-config neuron_config.{key}={extra[key]!r} conflicts with "
                f"{_DERIVED_FIELDS[key]} ({value!r}); set it through {_DERIVED_FIELDS[key]} only"
            )
    return NeuronConfig.from_dict({**extra, **derived})


def speculation_length(vllm_config: VllmConfig) -> int:
    """Drafts per row the verify graphs take: --speculative-config's num_speculative_tokens, or 0."""
    spec = vllm_config.speculative_config
    return 0 if spec is None else spec.num_speculative_tokens


def fit_to_compiled_folder(vllm_config: VllmConfig) -> None:
    """Serving a folder made by `vllm-neuron-qwen2 compile`: options left at their defaults take the folder's
    values (--max-model-len, --block-size, --num-gpu-blocks-override), and --max-num-seqs and
    --max-num-batched-tokens are capped at what it was compiled for. Other explicit values must match
    the folder (checked in `served_neuron_config`, which shows both)."""
    from .compile import artifacts
    from .config import NeuronConfig

    mc, sc, cc = vllm_config.model_config, vllm_config.scheduler_config, vllm_config.cache_config
    if not artifacts.is_servable(mc.model):
        return
    compiled = NeuronConfig.load(mc.model)
    if mc.original_max_model_len is None and mc.max_model_len != compiled.seq_len:
        logger.info("vllm-neuron-qwen2: max_model_len=%d, as %s was compiled for", compiled.seq_len, mc.model)
        mc.max_model_len = compiled.seq_len
    if not vllm_compat.block_size_given(cc):
        cc.block_size = compiled.block_size
    if cc.num_gpu_blocks_override is None:
        cc.num_gpu_blocks_override = compiled.num_blocks
    for option, name, compiled_value in (
        ("max_num_seqs", "max_num_seqs", compiled.batch_size),
        ("max_num_batched_tokens", "max_num_batched_tokens", compiled.max_num_batched_tokens),
    ):
        if getattr(sc, option) > compiled_value:
            logger.warning(
                "vllm-neuron-qwen2: %s=%d, as %s was compiled for (%d were asked)",
                name, compiled_value, mc.model, getattr(sc, option),
            )  # fmt: skip
            setattr(sc, option, compiled_value)


def served_neuron_config(vllm_config: VllmConfig) -> NeuronConfig:
    """The resolved NeuronConfig the decoder will serve with, checked at start-up rather than at load.

    For a folder made by `vllm-neuron-qwen2 compile`: the folder's own config, if it covers the request.
    """
    from .compile import artifacts
    from .config import Qwen2Shape
    from .modeling import serving_config

    try:
        shape = Qwen2Shape.from_dict(vllm_config.model_config.hf_config.to_dict())
        model_dir, requested = Path(vllm_config.model_config.model), requested_neuron_config(vllm_config)
        if not artifacts.is_servable(model_dir):
            artifacts.check_pin(model_dir, requested.pinned_digest)  # refuses a pin: only compiled folders
        return serving_config(model_dir, requested, shape)
    except (TypeError, ValueError, artifacts.ArtifactError) as e:
        sources = ", ".join(f"{key} <- {opt}" for key, opt in _DERIVED_FIELDS.items())
        raise ValueError(
            f"invalid Neuron configuration ({sources}; the rest from --additional-config): {e}"
        ) from e


def kv_pool_blocks(vllm_config: VllmConfig) -> int:
    """The KV pool, in blocks (block 0 included), when --num-gpu-blocks-override is not given: what fits
    --gpu-memory-utilization of one NeuronCore's memory (the cpu backend: of the host's available memory per
    rank process) beside the rank's weights and its largest graph's scratch, up to --max-num-seqs full-length
    sequences. Paging shares it: long contexts take blocks as they grow, rather than each reserving
    --max-model-len. Fails naming the figures when not even one full-length sequence fits."""
    from .compile.buckets import all_buckets
    from .compile.costs import blocks_that_fit, core_memory
    from .config import ConfigError, Qwen2Shape

    config = served_neuron_config(vllm_config)  # the pool at its largest: max_num_seqs full sequences
    shape = Qwen2Shape.from_dict(vllm_config.model_config.hf_config.to_dict())
    memory, where = placement.memory_per_rank(config.backend, config.tp_degree)
    utilization = vllm_config.cache_config.gpu_memory_utilization
    buckets = all_buckets(config)
    fits = blocks_that_fit(shape, config, buckets, memory, utilization)
    blocks = min(fits, config.num_blocks - 1)
    need = core_memory(shape, config, buckets)
    gib, block = 1 << 30, need.pool / config.num_blocks
    if blocks < config.blocks_per_seq:
        raise ConfigError(
            f"--max-model-len {config.seq_len}: one sequence's KV cache takes "
            f"{config.blocks_per_seq * block / gib:.3g} GiB per rank, but of --gpu-memory-utilization "
            f"{utilization} x {memory / gib:.3g} GiB ({where}) the weights take {need.weights / gib:.3g} "
            f"GiB and the graphs' scratch about {need.scratch / gib:.3g} GiB; lower --max-model-len, raise "
            "--tensor-parallel-size or --gpu-memory-utilization"
        )
    logger.info(
        "vllm-neuron-qwen2: KV pool of %d blocks (%.1f full-length sequences, %.2f GiB per rank): what fits "
        "%.0f%% of %.1f GiB (%s) beside %.2f GiB of weights and %.2f GiB of graph scratch, up to "
        "--max-num-seqs %d full-length sequences",
        1 + blocks, blocks / config.blocks_per_seq, blocks * block / gib, 100 * utilization, memory / gib,
        where, need.weights / gib, need.scratch / gib, config.batch_size,
    )  # fmt: skip
    return 1 + blocks


def _reject_unsupported(vllm_config: VllmConfig) -> None:
    # Pipeline parallelism needs no check: vLLM rejects it for model classes without SupportsPP.
    mc = vllm_config.model_config
    if vllm_config.lora_config is not None:
        raise ValueError("--enable-lora: LoRA is not supported by the vllm-neuron-qwen2 platform")
    if getattr(vllm_config, "watermark_config", None) is not None:
        raise ValueError("--watermark-config: watermarking is not supported by vllm-neuron-qwen2")
    spec = vllm_config.speculative_config
    if spec is not None and spec.method != "ngram":
        raise ValueError(
            f"--speculative-config method {spec.method!r}: vllm-neuron-qwen2 speculates with 'ngram' only "
            "(prompt lookup); draft models, EAGLE and Medusa are not supported"
        )
    if spec is not None and not 1 <= spec.num_speculative_tokens <= MAX_SPECULATION_LENGTH:
        raise ValueError(
            f"--speculative-config num_speculative_tokens {spec.num_speculative_tokens}: vllm-neuron-qwen2 "
            f"verifies 1 to {MAX_SPECULATION_LENGTH} drafts per row"
        )
    unsupported = [a for a in mc.architectures if a not in SUPPORTED_ARCHITECTURES]
    if unsupported or not mc.architectures:
        raise ValueError(
            f"--model: architectures {mc.architectures} are not supported by vllm-neuron-qwen2 "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if mc.runner_type != "generate":
        raise ValueError(f"--runner {mc.runner_type}: only text generation is supported by vllm-neuron-qwen2")
    if getattr(mc.hf_text_config, "use_sliding_window", False):
        raise ValueError(
            "--model: sliding window attention (use_sliding_window in config.json) is not supported"
        )
    if mc.quantization is not None:
        raise ValueError(
            f"--quantization {mc.quantization}: quantization is not supported by vllm-neuron-qwen2"
        )
    if vllm_config.cache_config.cache_dtype != "auto":
        raise ValueError(
            "--kv-cache-dtype: the Neuron decoder keeps its KV cache in the model dtype; use 'auto'"
        )


def _prepare_data_parallel_ranks(pc: ParallelConfig) -> None:
    """Before vLLM spawns this host's engine cores: check that their NeuronCores exist, and tell their
    workers how many rank processes share the host (placement.py places each rank in its own process)."""
    if active_backend() == "neuron":
        placement.check_core_budget(pc.data_parallel_size_local, pc.tensor_parallel_size)
    os.environ[placement.HOST_RANKS_ENV] = str(max(1, pc.data_parallel_size_local) * pc.tensor_parallel_size)


def _prepare_ray(pc: ParallelConfig) -> None:
    """--distributed-executor-backend ray, or --data-parallel-backend ray: vLLM's Ray executor (which
    vLLM 0.32 also uses for data-parallel actors, 0.16 only for TP > 1), on a cluster checked for
    NeuronCores before vLLM waits for them (ray_executor.py)."""
    from .ray_executor import NeuronRayExecutor, join_ray_cluster

    if pc.data_parallel_backend == "ray":  # vLLM's front end places the DP ranks' actors next
        join_ray_cluster(
            pc, pc.world_size * pc.data_parallel_size,
            f"--data-parallel-backend ray with DP {pc.data_parallel_size} x TP {pc.world_size}",
        )  # fmt: skip
    if pc.use_ray:
        pc.distributed_executor_backend = NeuronRayExecutor


def _name_dead_engine_cores() -> None:
    """vLLM 0.32 shuts the server down when an engine core process dies, but only says "EngineCore encountered
    an issue"; with data parallelism the operator needs to know which rank died. Log it."""
    manager = vllm_compat.engine_liveness_monitor()
    if manager is None:  # this vLLM names the dead process itself
        return
    watch = manager.monitor_engine_liveness
    if getattr(watch, "names_dead_engines", False):  # already wrapped
        return

    def monitor_engine_liveness(self: Any) -> None:
        watch(self)
        name = self.failed_proc_name  # set by vLLM for a process that exited with an error
        if name is not None:
            logger.error(
                "vllm-neuron-qwen2: engine core process %s (data-parallel rank %s) died with exit code %s; "
                "the server shuts down",
                name, name.partition("_DP")[2] or 0, self.finished_procs().get(name),
            )  # fmt: skip

    monitor_engine_liveness.names_dead_engines = True
    manager.monitor_engine_liveness = monitor_engine_liveness


def _replace_parallel_check() -> None:
    """vLLM requires attention heads divisible by the TP degree; the Neuron decoder pads query heads and
    replicates KV heads instead (Qwen2-0.5B's 14 heads run on TP 4). Only pipeline parallelism is refused."""
    from vllm.config import ModelConfig

    def verify_with_parallel_config(self: ModelConfig, parallel_config: Any) -> None:
        if parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                "--pipeline-parallel-size: pipeline parallelism is not supported by vllm-neuron-qwen2"
            )

    ModelConfig.verify_with_parallel_config = verify_with_parallel_config


def _replace_batch_defaults() -> None:
    """vLLM's defaults for --max-num-seqs (256) and --max-num-batched-tokens (2048-8192) are sized for GPUs;
    here every decode row count and prefill length is a compiled graph, so the platform sets its own."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    contexts = [None, *UsageContext]

    def get_batch_defaults(cls: type, world_size: int) -> tuple[dict, dict]:
        return (
            dict.fromkeys(contexts, DEFAULT_MAX_NUM_BATCHED_TOKENS),
            dict.fromkeys(contexts, DEFAULT_MAX_NUM_SEQS),
        )

    EngineArgs.get_batch_defaults = classmethod(get_batch_defaults)


def _make_accelerator_cache_calls_safe() -> None:
    # vLLM's shutdown path (cleanup_dist_env_and_memory) empties the accelerator cache on every non-CPU
    # platform, which raises on a host without one. This module is imported in every vLLM process.
    if not torch.accelerator.is_available():
        torch.accelerator.empty_cache = lambda: None
        if hasattr(torch.accelerator, "empty_host_cache"):
            torch.accelerator.empty_host_cache = lambda: None


_make_accelerator_cache_calls_safe()


class NeuronQwen2Platform(Platform):
    _enum = PlatformEnum.OOT
    # vLLM builds torch devices from device_name for OOT platforms, so both must be a real torch device type;
    # the user-facing name comes from get_device_name().
    device_name: str = "cpu"
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
    # Ray schedules workers on NeuronCores and leaves NEURON_RT_VISIBLE_CORES to the worker (placement.py).
    ray_device_key: str = "neuron_cores"
    ray_noset_device_env_vars: list[str] = [f"RAY_EXPERIMENTAL_NOSET_{placement.VISIBLE_CORES_ENV}"]
    device_control_env_var: str = placement.VISIBLE_CORES_ENV
    additional_env_vars: list[str] = [ARTIFACTS_ENV]  # copied to Ray workers beside VLLM_*
    simple_compile_backend: str = "eager"

    # Set by check_and_update_config in the front-end process, read by validate_request there.
    _vocab_size: int | None = None

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        # vLLM's --dtype auto keeps the checkpoint's dtype when it is listed here, else takes the first
        # entry (also for float32 checkpoints). On cpu float32 comes first: the backend exists to verify
        # graphs against HF float32, so float32 checkpoints stay float32 and bfloat16 ones stay bfloat16.
        return [torch.bfloat16] if active_backend() == "neuron" else [torch.float32, torch.bfloat16]

    @classmethod
    def import_kernels(cls) -> None:
        # vLLM's host-side ops (sampler, penalties) load its C kernels; the base class imports the
        # AVX-512 build, which dies with SIGILL on AVX2-only hosts. vLLM's CPU platform picks the right one.
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.import_kernels()

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return "neuron" if active_backend() == "neuron" else "neuron-cpu"

    @classmethod
    def get_device_uuid(cls, device_id: int = 0) -> str:
        return f"{cls.get_device_name()}-{device_id}"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        # The model owns its KV cache and vLLM's block count is overridden, so host memory is a fine stand-in.
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        pass

    @classmethod
    def device_id_to_physical_device_id(cls, device_id: int) -> int:
        # vLLM maps each DP rank's logical cores through this (see placement.py); the base class cannot read
        # ranges such as NEURON_RT_VISIBLE_CORES=0-7. The cpu backend has no NeuronCores to map.
        return placement.physical_core(device_id) if active_backend() == "neuron" else device_id

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        torch.manual_seed(seed)

    @classmethod
    def inference_mode(cls) -> contextlib.AbstractContextManager[Any]:
        return torch.no_grad()

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def get_current_memory_usage(cls, device: torch.types.Device | None = None) -> float:
        return 0.0

    @classmethod
    def pre_register_and_update(cls, parser: FlexibleArgumentParser | None = None) -> None:
        _replace_parallel_check()
        _replace_batch_defaults()
        _name_dead_engine_cores()
        # vLLM 0.32 removed --device; accept the historical `--device neuron` (the platform is the selection).
        if parser is not None and not any("--device" in a.option_strings for a in parser._actions):
            parser.add_argument(
                "--device",
                choices=["neuron"],
                default=None,
                help="Accepted for compatibility; the vllm-neuron-qwen2 platform always serves on Neuron "
                f"(or on its cpu backend when {BACKEND_ENV}=cpu).",
            )

    @classmethod
    def validate_environ(cls, hard_fail: bool) -> None:
        from vllm import envs

        # vLLM flags VLLM_* variables it does not know; these belong to the platform.
        for name in (BACKEND_ENV, placement.HOST_RANKS_ENV):
            envs.environment_variables.setdefault(name, lambda name=name: os.environ.get(name))
        super().validate_environ(hard_fail)

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        from vllm.config import CompilationMode, CUDAGraphMode

        mc = vllm_config.model_config
        pc, sc, cc = vllm_config.parallel_config, vllm_config.scheduler_config, vllm_config.cache_config
        if pc.worker_cls == "auto":
            pc.worker_cls = "vllm_neuron_qwen2.worker.NeuronQwen2Worker"
        vllm_config.compilation_config.mode = CompilationMode.NONE
        vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
        if mc is None:  # vLLM also builds throw-away default configs
            return

        _reject_unsupported(vllm_config)
        if not vllm_compat.block_size_given(cc):
            cc.block_size = DEFAULT_BLOCK_SIZE
        fit_to_compiled_folder(vllm_config)
        if cc.num_gpu_blocks_override is None:
            cc.num_gpu_blocks_override = kv_pool_blocks(vllm_config)
        served = served_neuron_config(vllm_config)
        cls._vocab_size = mc.get_vocab_size()

        # Forking a process whose OpenMP pool is already running (any torch op before LLM(...)) deadlocks
        # the child's first parallel op; the engine core and the TP ranks are therefore spawned.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        placement.remember_user_threads()
        if active_backend() == "cpu":
            placement.keep_freed_memory()
        if pc.use_ray or pc.data_parallel_backend == "ray":
            _prepare_ray(pc)
        if not pc.use_ray:
            # cpu: one gloo rank per shard; on Neuron, TP lives inside the runtime
            tp_over_processes = active_backend() == "cpu" and pc.tensor_parallel_size > 1
            pc.distributed_executor_backend = "mp" if tp_over_processes else "uni"
        _prepare_data_parallel_ranks(pc)

        # vLLM's block pool allocates exactly the model's pool (block 0 is its null block, our padding block).
        cc.num_gpu_blocks_override = served.num_blocks
        vllm_compat.cap_scheduled_tokens(sc)
        logger.info_once(
            "vllm-neuron-qwen2: paged KV cache of %d blocks x %d tokens (%.1f full-length sequences), "
            "prefix caching %s, chunked prefill %s, %d tokens per step",
            served.num_blocks, served.block_size, (served.num_blocks - 1) / served.blocks_per_seq,
            "on" if cc.enable_prefix_caching else "off", "on" if sc.enable_chunked_prefill else "off",
            sc.max_num_batched_tokens,
        )  # fmt: skip

    @classmethod
    def update_block_size_for_backend(cls, vllm_config: VllmConfig) -> None:
        # The block size was settled in check_and_update_config; vLLM's attention backends do not apply.
        pass

    @classmethod
    def validate_request(
        cls, processed_inputs: EngineInput, params: SamplingParams | PoolingParams, prompt: object = None
    ) -> None:
        """vLLM 0.32 passes (processed_inputs, params); 0.16 passes them by keyword, with the prompt too."""
        from vllm.sampling_params import SamplingParams

        if not isinstance(params, SamplingParams):
            raise VLLMValidationError("only text generation is supported on vllm-neuron-qwen2")
        # vLLM 0.32's fields; 0.16 has none of them
        for name in ("prompt_logprob_token_ids", "thinking_token_budget", "trace_decode_token_ids",
                     "logprob_token_ids"):  # fmt: skip
            if getattr(params, name, None) is not None:
                raise VLLMValidationError(f"{name} is not supported on vllm-neuron-qwen2", parameter=name)

        if processed_inputs.get("type") not in (None, "token"):
            raise VLLMValidationError("only token or text prompts are supported on vllm-neuron-qwen2")
        prompt_ids = processed_inputs.get("prompt_token_ids") or []
        # vLLM accepts ids up to the tokenizer size, which may exceed the model's embedding table.
        if (
            cls._vocab_size is not None
            and prompt_ids
            and not 0 <= min(prompt_ids) <= max(prompt_ids) < cls._vocab_size
        ):
            raise VLLMValidationError(
                f"prompt token ids must lie in the model's vocabulary [0, {cls._vocab_size})",
                parameter="prompt_token_ids",
            )
