"""NeuronQwen2ForCausalLM: the standalone API. Requests name KV slots; calls are padded into buckets.

model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, NeuronConfig(batch_size=4, seq_len=512))
logits = model.prefill(input_ids=[[...], [...]], seq_ids=[3, 0])                 # [2, vocab]
logits = model.decode(input_ids=[t3, t0], position_ids=[p3, p0], seq_ids=[3, 0])  # [2, vocab]
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .compile import artifacts
from .compile.backend import build_graphs
from .compile.buckets import Bucket, all_buckets, smallest_fitting
from .config import NeuronConfig, Qwen2Shape
from .model.parallel import TPGroup
from .model.qwen2 import Qwen2Decoder

logger = logging.getLogger(__name__)


class PaddingStats:
    """Real and padded tokens per bucket, to measure what the bucket choice wastes."""

    def __init__(self) -> None:
        self.real: Counter[Bucket] = Counter()
        self.padded: Counter[Bucket] = Counter()

    def add(self, bucket: Bucket, real: int) -> None:
        total = bucket.batch * (bucket.length if bucket.kind == "prefill" else 1)
        self.real[bucket] += real
        self.padded[bucket] += total - real


def serving_config(model_dir: Path, requested: NeuronConfig, shape: Qwen2Shape) -> NeuronConfig:
    """The resolved config `model_dir` is served with: for a folder made by `vllm-neuron-qwen2 compile`, its
    own config, which must cover `requested` (else a ConfigError shows both); else `requested`."""
    if artifacts.is_servable(model_dir):
        requested = artifacts.open_servable(model_dir, requested)
    return requested.resolve(shape)


class NeuronQwen2ForCausalLM:
    def __init__(self, decoder: Qwen2Decoder, config: NeuronConfig, graphs: dict[Bucket, Callable]):
        self.decoder, self.config, self.graphs = decoder, config, graphs
        self.vocab_size = decoder.shape.vocab_size
        self.padding = PaddingStats()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: NeuronConfig) -> NeuronQwen2ForCausalLM:
        """Build this rank's shard for `config` (defaults filled from the checkpoint) and load its weights.

        `model_dir` is a HF checkpoint, or a folder made by `vllm-neuron-qwen2 compile`: that one is served
        with the config it was compiled for, which must cover `config` (else a ConfigError shows both).
        """
        model_dir = Path(model_dir)
        shape = Qwen2Shape.from_pretrained(model_dir)
        config = serving_config(model_dir, config, shape)
        if config.backend == "neuron":  # one process drives every rank (TP runs as SPMD): this is rank 0
            tp = TPGroup(size=config.tp_degree)
        else:
            tp = TPGroup.current(config.tp_degree)
        logger.info(
            "Qwen2 decoder: %d layers, tp_degree=%d (rank %d), %d slots x %d tokens, %s, backend=%s",
            shape.num_hidden_layers, config.tp_degree, tp.rank, config.batch_size, config.seq_len,
            config.dtype, config.backend,
        )  # fmt: skip
        decoder = Qwen2Decoder(shape, config, tp)
        artifacts.load_weights(decoder, model_dir, progress=tp.rank == 0)
        decoder.eval()
        graphs = build_graphs(decoder, config, all_buckets(config), model_dir)
        return cls(decoder, config, graphs)

    @torch.inference_mode()
    def prefill(
        self, input_ids: Sequence[Sequence[int]], seq_ids: Sequence[int], sampling: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write whole prompts into slots; returns last-token logits [B, vocab] (or sampled ids [B]).

        Prompts are grouped by length bucket and each group runs as one batched graph call.
        """
        self._check_rows(len(input_ids), seq_ids, sampling)
        cfg = self.config
        lengths = [len(p) for p in input_ids]
        for n in lengths:
            if n < 1:
                raise ValueError("empty prompt")
            if n > cfg.max_context_length:
                raise ValueError(f"prompt of {n} tokens exceeds max_context_length={cfg.max_context_length}")
        self._check_ids([t for p in input_ids for t in p])
        by_bucket: dict[int, list[int]] = {}
        for row, n in enumerate(lengths):
            length = smallest_fitting(cfg.prefill_lengths, n, "prompt length", "prefill_lengths")
            by_bucket.setdefault(length, []).append(row)
        out = [None] * len(input_ids)
        for length, rows in by_bucket.items():
            for chunk in _chunks(rows, cfg.prefill_batch_sizes[-1]):
                batch = smallest_fitting(
                    cfg.prefill_batch_sizes, len(chunk), "prefill batch", "prefill_batch_sizes"
                )
                ids = torch.zeros(batch, length, dtype=torch.int64)
                for i, row in enumerate(chunk):
                    ids[i, : lengths[row]] = torch.tensor(input_ids[row])
                last = self._pad([lengths[row] - 1 for row in chunk], batch, 0)
                self._run(
                    "prefill",
                    batch,
                    length,
                    chunk,
                    sum(lengths[r] for r in chunk),
                    ids,
                    last,
                    seq_ids,
                    sampling,
                    out,
                )
        return torch.stack(out)

    @torch.inference_mode()
    def decode(
        self,
        input_ids: Sequence[int],
        position_ids: Sequence[int],
        seq_ids: Sequence[int],
        sampling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per slot at its position; returns logits [B, vocab] (or sampled ids [B])."""
        cfg = self.config
        self._check_rows(len(input_ids), seq_ids, sampling)
        if len(position_ids) != len(input_ids):
            raise ValueError(f"{len(input_ids)} input_ids but {len(position_ids)} position_ids")
        if min(position_ids) < 0 or max(position_ids) >= cfg.seq_len:
            raise ValueError(f"position_ids must lie in [0, seq_len={cfg.seq_len}), got {list(position_ids)}")
        self._check_ids(input_ids)
        length = smallest_fitting(
            cfg.decode_lengths, max(position_ids) + 1, "decode position", "decode_lengths"
        )
        out = [None] * len(input_ids)
        for chunk in _chunks(range(len(input_ids)), cfg.decode_batch_sizes[-1]):
            batch = smallest_fitting(cfg.decode_batch_sizes, len(chunk), "decode batch", "decode_batch_sizes")
            ids = self._pad([input_ids[r] for r in chunk], batch, 0)
            positions = self._pad([position_ids[r] for r in chunk], batch, 0)
            self._run("decode", batch, length, chunk, len(chunk), ids, positions, seq_ids, sampling, out)
        return torch.stack(out)

    def _run(self, kind, batch, length, rows, real_tokens, ids, index, seq_ids, sampling, out) -> None:
        """Run one bucket graph for `rows` of the caller's batch and scatter its results into `out`."""
        bucket = Bucket(kind, batch, length, sampling is not None)
        slots = self._pad([seq_ids[r] for r in rows], batch, self.decoder.kv_cache.spare_slot)
        params = torch.zeros(batch, 4)
        if sampling is not None:
            params[: len(rows)] = sampling[list(rows)]
        result = self.graphs[bucket](ids, index, slots, params)
        self.padding.add(bucket, real_tokens)
        for i, row in enumerate(rows):
            out[row] = result[i]

    def _check_rows(self, n: int, seq_ids: Sequence[int], sampling: torch.Tensor | None) -> None:
        slots = self.config.batch_size
        if n == 0 or len(seq_ids) != n:
            raise ValueError(
                f"need one seq_id per row and at least one row, got {n} rows and {len(seq_ids)} seq_ids"
            )
        if len(set(seq_ids)) != n or not all(0 <= s < slots for s in seq_ids):
            raise ValueError(
                f"seq_ids must be distinct slots in [0, batch_size={slots}), got {list(seq_ids)}"
            )
        if sampling is not None:
            if not self.config.on_device_sampling:
                raise ValueError("sampling= needs neuron_config.on_device_sampling=true")
            if tuple(sampling.shape) != (n, 4):
                raise ValueError(f"sampling must be a [{n}, 4] tensor, got {list(sampling.shape)}")

    def _check_ids(self, ids: Sequence[int]) -> None:
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size})")

    @staticmethod
    def _pad(values: list[int], batch: int, fill: int) -> torch.Tensor:
        return torch.tensor(values + [fill] * (batch - len(values)), dtype=torch.int64)


def _chunks(rows: Sequence[int], size: int) -> list[list[int]]:
    rows = list(rows)
    return [rows[i : i + size] for i in range(0, len(rows), size)]
