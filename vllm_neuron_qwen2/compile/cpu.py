"""cpu backend: every bucket graph through torch.compile, with inductor's caches kept in the artifact folder.

A compiled graph compiles at its first call, so warm-up calls each one once. On a warm start the folder's
FX-graph and AOT-autograd caches turn that into tracing plus loading the cached kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from tqdm import tqdm

from ..config import NeuronConfig
from ..model.graphs import BucketGraph, example_inputs
from ..model.parallel import PLAIN_GEMM_ROWS
from ..model.qwen2 import Qwen2Decoder
from . import artifacts
from .buckets import Bucket

INDUCTOR_DIR = "inductor"


def can_prepack(dtype: str) -> bool:
    """oneDNN blocks bfloat16 weights only on CPUs with AVX-512 (BW, VL, DQ); float32 ones everywhere."""
    return dtype != "bfloat16" or torch.cpu._is_avx512_supported()


def keeps_plain_weights(config: NeuronConfig, buckets: list[Bucket]) -> bool:
    """Whether the layers keep their plain weights beside the prepacked ones, for prompt chunks: in float32,
    where the default GEMM (MKL) beats oneDNN's blocked layout from PLAIN_GEMM_ROWS rows (in bfloat16 both
    are oneDNN's), and only when some graph feeds its linears that many."""
    return (
        config.backend == "cpu" and config.dtype == "float32"
        and any(b.row_token_count() + b.tokens >= PLAIN_GEMM_ROWS for b in buckets)
    )  # fmt: skip


def build_cpu_graphs(
    decoder: Qwen2Decoder, config: NeuronConfig, buckets: list[Bucket], model_dir: Path
) -> dict[Bucket, Callable]:
    graphs = {b: BucketGraph(decoder, b) for b in buckets}
    # oneDNN's blocked weights stream ~3x faster than BLAS at decode's few rows; compiled graphs call them
    # as opaque ops (torch.ops.vllm_neuron_qwen2.packed_linear) and fuse what lies between
    if can_prepack(config.dtype):
        decoder.prepack_linears(config.decode_batch_sizes[-1], keeps_plain_weights(config, buckets))
    if config.compile_mode == "eager":
        return graphs
    compiled = {b: torch.compile(g, fullgraph=True, dynamic=False) for b, g in graphs.items()}

    def warm_up(folder: Path, action: str) -> None:
        # Dynamo keeps compiled code per code object, so every bucket (of every model in this process) adds
        # an entry to BucketGraph.forward: lift its recompile limits while the graphs compile.
        with (
            temporary_cache_dir(str(folder / INDUCTOR_DIR)),
            torch._dynamo.config.patch(recompile_limit=1 << 16, accumulated_recompile_limit=1 << 16),
            torch.no_grad(),  # as the graphs are called (dynamo guards on the grad mode)
        ):
            bar = tqdm(buckets, desc=f"{action} bucket graphs", unit="graph", disable=decoder.tp.rank != 0)
            for bucket in bar:
                bar.set_postfix_str(str(bucket))
                # Warm-up writes its K/V into the padding block, never into a live one.
                compiled[bucket](*example_inputs(bucket, config.block_size, decoder.shape.vocab_size))

    def build(tmp: Path) -> None:
        # Dynamo would reuse graphs this process compiled before (for another model instance, another
        # folder); start afresh so that every graph is compiled, and cached, into the new folder.
        torch.compiler.reset()
        warm_up(tmp, "compiling")

    folder, built = artifacts.prepare(config, model_dir, build, decoder.tp)
    if not built:
        warm_up(folder, "loading")
    return compiled
