"""NeuronConfig (the static shapes a model is built for) and Qwen2Shape (what the checkpoint says).

Every inconsistent combination fails here, with a message naming the field and the fix, so that no
bad value reaches a graph.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NEURON_CONFIG_FILE = "neuron_config.json"
BACKENDS = ("cpu", "neuron")
DTYPES = ("float32", "bfloat16", "float16")
COMPILE_MODES = ("eager", "compiled")


class ConfigError(ValueError):
    """A NeuronConfig or model config value that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class Qwen2Shape:
    """The geometry of a Qwen2 checkpoint, read from its raw config.json."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, hf: dict[str, Any]) -> Qwen2Shape:
        archs = hf.get("architectures") or ["Qwen2ForCausalLM"]
        if archs[0] != "Qwen2ForCausalLM":
            raise ConfigError(f"architectures={archs}: only Qwen2ForCausalLM (Qwen2, Qwen2.5) is supported")
        if hf.get("use_sliding_window", False):
            raise ConfigError(
                "use_sliding_window=true is not supported: the decoder implements full attention only; "
                "set use_sliding_window=false in config.json (all official Qwen2/Qwen2.5 configs do)"
            )
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not implemented (only default RoPE); "
                "remove rope_scaling from config.json or use a context length within max_position_embeddings"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported; Qwen2 uses silu")
        heads = hf["num_attention_heads"]
        return cls(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Qwen2Shape:
        return cls.from_dict(json.loads((Path(model_dir) / "config.json").read_text()))


def _ladder(smallest: int, largest: int, multiple: int) -> list[int]:
    """The powers of two, and 1.5x them from STREAMING_TOKENS, in [smallest, largest) that are multiples of
    `multiple`, then `largest`. Below STREAMING_TOKENS a step streams the weights, so padding costs little;
    above, steps of at most 1.5x cap it at a third of a bucket. The number of graphs grows logarithmically."""
    sizes, p = set(), 1
    while p < largest:
        steps = (p, p * 3 // 2) if p >= STREAMING_TOKENS else (p,)
        sizes.update(s for s in steps if smallest <= s < largest and s % multiple == 0)
        p *= 2
    return sorted(sizes) + [largest]


def _context_ladder(smallest: int, largest: int) -> list[int]:
    """`smallest`, 4x it, 16x it, ... below `largest`, and `largest`; then half and three quarters of
    `largest` (sequences half or three quarters of the way to their end attend no more than they need), each
    once it is 4x `smallest`, while there are fewer than MAX_DEFAULT_CONTEXTS. A step attends at most 4x the
    context it needs (1.5x in the upper half of lengths of 8k-16k, where long prompts spend most), and even
    at 32k the graphs stay few."""
    sizes, c = {largest}, smallest
    while c < largest:
        sizes.add(c)
        c *= 4
    for upper in (largest // 2, largest * 3 // 4):
        if upper >= 4 * smallest and len(sizes) < MAX_DEFAULT_CONTEXTS:
            sizes.add(upper)
    return sorted(sizes)


BUCKET_FIELDS = ("prefill_lengths", "decode_batch_sizes", "context_lengths")
# Prefill graphs take multiples of this many prompt tokens (the smallest prefill graph).
PREFILL_STEP = 8
# Prompt tokens below which a prefill step is bound by streaming the weights rather than by compute (about 53
# in float32 on a 2-core AVX-512 Xeon, measured; about 250 for Qwen2-7B in bf16 on a NeuronCore, estimated
# from its published bandwidth and bf16 rate, not measured).
STREAMING_TOKENS = 64
# The smallest context bucket by default: below it, attention is small next to streaming the weights.
SMALLEST_CONTEXT = 512
# Context buckets by default at most: each adds 6 graphs (3 decode, 3 prefill), 40 in all at 32k.
MAX_DEFAULT_CONTEXTS = 5
BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
# Drafts per row a verify graph checks: each adds a row token to every verify call, accepted or not.
MAX_SPECULATION_LENGTH = 7


@dataclass
class NeuronConfig:
    """Static shapes and placement of one compiled model. Saved as `neuron_config.json`.

    `None` fields are derived from the model config in `resolve()`.
    """

    batch_size: int = 1  # the most sequences in one step (vLLM's max_num_seqs)
    seq_len: int | None = None  # most tokens (prompt + output) per sequence
    tp_degree: int = 1
    dtype: str | None = None  # float32 on cpu, bfloat16 on neuron
    backend: str = "cpu"
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV-cache block
    num_blocks: int | None = (
        None  # KV-cache blocks incl. block 0 (padding); default: batch_size full sequences
    )
    max_num_batched_tokens: int | None = None  # tokens per step (vLLM's); default min(seq_len, 512)
    prefill_lengths: list[int] | None = None  # prompt tokens per prefill graph (multiples of PREFILL_STEP)
    decode_batch_sizes: list[int] | None = None  # rows per decode graph
    context_lengths: list[int] | None = None  # longest row a graph attends (multiples of block_size)
    on_device_sampling: bool = True  # greedy/temperature/top-k/top-p inside the decode graphs
    max_topk: int = 256  # top-k bound of the in-graph sampler (as on Neuron)
    speculation_length: int = 0  # most drafts a decode row carries (n-gram speculation); 0: no verify graphs
    compile_mode: str = "eager"  # cpu backend: run graphs eagerly or through torch.compile
    compiled_artifacts: str | None = None  # artifact folder; default ~/.cache/vllm-neuron-qwen2/<key>
    pinned_digest: str | None = None  # serve a compiled folder only if its digest (`info`) is this one

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NeuronConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown neuron_config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / NEURON_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> NeuronConfig:
        return cls.from_dict(json.loads((Path(folder) / NEURON_CONFIG_FILE).read_text()))

    @property
    def blocks_per_seq(self) -> int:
        """Blocks one full-length sequence needs (the width of a block table)."""
        return math.ceil(self.seq_len / self.block_size)

    def resolve(self, shape: Qwen2Shape) -> NeuronConfig:
        """Fill the defaults from the model config and check every field; returns a new config."""
        _require(self.backend in BACKENDS, "backend", f"{self.backend!r} is not one of {BACKENDS}")
        dtype = self.dtype or ("float32" if self.backend == "cpu" else "bfloat16")
        _require(dtype in DTYPES, "dtype", f"{dtype!r} is not one of {DTYPES}")
        _require(
            not (self.backend == "cpu" and dtype == "float16"),
            "dtype",
            "float16 is not supported on the cpu backend; use float32 or bfloat16 (Neuron's dtype) (--dtype)",
        )
        _require(
            self.compile_mode in COMPILE_MODES,
            "compile_mode",
            f"{self.compile_mode!r} is not one of {COMPILE_MODES}",
        )
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.tp_degree >= 1, "tp_degree", f"must be >= 1, got {self.tp_degree}")
        _require(
            self.tp_degree <= shape.num_attention_heads,
            "tp_degree",
            f"{self.tp_degree} exceeds num_attention_heads={shape.num_attention_heads}, so some ranks would "
            f"hold only padding heads; use tp_degree <= {shape.num_attention_heads}",
        )
        seq_len = self.seq_len or min(shape.max_position_embeddings, 2048)
        _require(seq_len >= 2, "seq_len", f"must be >= 2, got {seq_len}")
        _require(
            seq_len <= shape.max_position_embeddings,
            "seq_len",
            f"{seq_len} exceeds max_position_embeddings={shape.max_position_embeddings}; lower it",
        )
        _require(
            self.block_size in BLOCK_SIZES,
            "block_size",
            f"{self.block_size} is not one of {BLOCK_SIZES} (--block-size)",
        )
        blocks_per_seq = math.ceil(seq_len / self.block_size)
        num_blocks = self.num_blocks or 1 + self.batch_size * blocks_per_seq
        _require(
            num_blocks >= 1 + blocks_per_seq,
            "num_blocks",
            f"{num_blocks} blocks of {self.block_size} tokens cannot hold one sequence of seq_len={seq_len} "
            f"({blocks_per_seq} blocks) besides the padding block 0; use at least {1 + blocks_per_seq} "
            "(--num-gpu-blocks-override)",
        )
        budget = self.max_num_batched_tokens or min(seq_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
        _require(budget >= 1, "max_num_batched_tokens", f"must be >= 1, got {budget}")
        _require(self.max_topk >= 1, "max_topk", f"must be >= 1, got {self.max_topk}")
        _require(
            0 <= self.speculation_length <= MAX_SPECULATION_LENGTH,
            "speculation_length",
            f"must lie in [0, {MAX_SPECULATION_LENGTH}], got {self.speculation_length} "
            "(num_speculative_tokens in --speculative-config)",
        )
        _require(
            self.on_device_sampling or not self.speculation_length,
            "speculation_length",
            "verify graphs sample in the graph; set on_device_sampling=true",
        )
        context = blocks_per_seq * self.block_size
        prefill_tokens = pad_to_multiple(budget, PREFILL_STEP)
        smallest_context = min(pad_to_multiple(SMALLEST_CONTEXT, self.block_size), context)
        return dataclasses.replace(
            self,
            seq_len=seq_len,
            dtype=dtype,
            num_blocks=num_blocks,
            max_num_batched_tokens=budget,
            prefill_lengths=_buckets(
                "prefill_lengths",
                self.prefill_lengths or _ladder(PREFILL_STEP, prefill_tokens, PREFILL_STEP),
                prefill_tokens,
                f"max_num_batched_tokens rounded up to {PREFILL_STEP}",
                PREFILL_STEP,
            ),
            # a lone sequence, half and all: decode streams the weights, so a padded row costs little
            decode_batch_sizes=_buckets(
                "decode_batch_sizes",
                self.decode_batch_sizes or sorted({1, max(1, self.batch_size // 2), self.batch_size}),
                self.batch_size,
                "batch_size",
                1,
            ),
            # each step attends the smallest that covers its longest row
            context_lengths=_buckets(
                "context_lengths",
                self.context_lengths or _context_ladder(smallest_context, context),
                context,
                "seq_len rounded up to a block",
                self.block_size,
            ),
        )


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"neuron_config.{name}: {problem}")


def _buckets(name: str, given: list[int], largest: int, limit_name: str, multiple: int) -> list[int]:
    """Sorted, deduplicated bucket sizes, multiples of `multiple`, the largest one at the limit."""
    _require(len(given) > 0, name, "must not be empty")
    _require(
        all(isinstance(b, int) and b >= 1 and b % multiple == 0 for b in given),
        name,
        f"must be positive multiples of {multiple}, got {given}",
    )
    sizes = sorted(set(given))
    _require(
        sizes[-1] == largest,
        name,
        f"the largest bucket must be {limit_name}={largest}, got {sizes[-1]}",
    )
    return sizes


def pad_to_multiple(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple
