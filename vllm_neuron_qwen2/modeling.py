"""NeuronQwen2ForCausalLM: the standalone API. Requests name KV slots; calls are padded into buckets.

model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, NeuronConfig(batch_size=4, seq_len=512))
logits = model.prefill(input_ids=[[...], [...]], seq_ids=[3, 0])                 # [2, vocab]
logits = model.decode(input_ids=[t3, t0], position_ids=[p3, p0], seq_ids=[3, 0])  # [2, vocab]
logits = model.step(input_ids=[t3], position_ids=[p3], seq_ids=[3], prompts=[[...]], prompt_seq_ids=[1])
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
        total = bucket.length if bucket.kind == "prefill" else bucket.batch  # packed prompt tokens, or rows
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

    def prefill(
        self, input_ids: Sequence[Sequence[int]], seq_ids: Sequence[int], sampling: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write whole prompts into slots; returns last-token logits [B, vocab] (or sampled ids [B])."""
        return self.step(prompts=input_ids, prompt_seq_ids=seq_ids, sampling=sampling)

    def decode(
        self,
        input_ids: Sequence[int],
        position_ids: Sequence[int],
        seq_ids: Sequence[int],
        sampling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per slot at its position; returns logits [B, vocab] (or sampled ids [B])."""
        return self.step(input_ids=input_ids, position_ids=position_ids, seq_ids=seq_ids, sampling=sampling)

    @torch.inference_mode()
    def step(
        self,
        *,
        input_ids: Sequence[int] = (),
        position_ids: Sequence[int] = (),
        seq_ids: Sequence[int] = (),
        prompts: Sequence[Sequence[int]] = (),
        prompt_seq_ids: Sequence[int] = (),
        sampling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One serving step: slots `seq_ids` each take one token (input_ids at position_ids) and whole
        `prompts` are written into slots `prompt_seq_ids`. Returns logits [rows, vocab] (or sampled ids
        [rows]), the decode rows first, then the prompts.

        Without prompts, decode rows run in decode graphs. Prompts are packed end to end into prefill graphs
        of at most `prefill_lengths[-1]` tokens, and the decode rows ride along in the first of them, so
        a step streams the weights once.
        """
        self._check_step(input_ids, position_ids, seq_ids, prompts, prompt_seq_ids, sampling)
        cfg, n_decode = self.config, len(input_ids)
        out: list[torch.Tensor | None] = [None] * (n_decode + len(prompts))
        sample = sampling is not None
        if not prompts:
            for rows in _chunks(range(n_decode), cfg.decode_batch_sizes[-1]):
                batch = smallest_fitting(
                    cfg.decode_batch_sizes, len(rows), "decode batch", "decode_batch_sizes"
                )
                length = smallest_fitting(
                    cfg.decode_lengths,
                    max(position_ids[r] for r in rows) + 1,
                    "decode position",
                    "decode_lengths",
                )
                self._run(
                    Bucket("decode", batch, length, sample),
                    rows,
                    len(rows),
                    ids=[input_ids[r] for r in rows],
                    positions=[position_ids[r] for r in rows],
                    slots=[seq_ids[r] for r in rows],
                    logit_index=list(range(len(rows))),
                    sampling=sampling,
                    out=out,
                )
            return torch.stack(out)

        spare = self.decoder.kv_cache.spare_slot
        carried = list(range(n_decode))  # decode rows, carried by the first prefill call
        for group in _pack([len(p) for p in prompts], cfg.prefill_lengths[-1]):
            batch = cfg.batch_size
            ids = _padded([input_ids[r] for r in carried], batch, 0)
            positions = _padded([position_ids[r] for r in carried], batch, 0)
            slots = _padded([seq_ids[r] for r in carried], batch, spare)
            logit_index = list(range(len(carried)))
            for k in group:
                ids += prompts[k]
                positions += range(len(prompts[k]))
                slots += [prompt_seq_ids[k]] * len(prompts[k])
                logit_index.append(len(ids) - 1)
            real = len(ids) - batch
            length = smallest_fitting(cfg.prefill_lengths, real, "prompt tokens", "prefill_lengths")
            self._run(
                Bucket("prefill", batch, length, sample),
                [*carried, *(n_decode + k for k in group)],
                real,
                ids=ids,
                positions=positions,
                slots=slots,
                logit_index=logit_index,
                sampling=sampling,
                out=out,
            )
            carried = []
        return torch.stack(out)

    def _run(self, bucket, rows, real_tokens, *, ids, positions, slots, logit_index, sampling, out) -> None:
        """Run one bucket graph, its inputs padded to the bucket's shapes (padding in the spare slot);
        output row j is the caller's row rows[j] and goes into out."""
        n, spare = bucket.tokens(), self.decoder.kv_cache.spare_slot
        params = torch.zeros(bucket.batch, 4)
        if sampling is not None:
            params[: len(rows)] = sampling[list(rows)]
        result = self.graphs[bucket](
            torch.tensor(_padded(ids, n, 0)),
            torch.tensor(_padded(positions, n, 0)),
            torch.tensor(_padded(slots, n, spare)),
            torch.tensor(_padded(logit_index, bucket.batch, 0)),
            params,
        )
        self.padding.add(bucket, real_tokens)
        for j, row in enumerate(rows):
            out[row] = result[j]

    def _check_step(self, input_ids, position_ids, seq_ids, prompts, prompt_seq_ids, sampling) -> None:
        cfg, n_decode = self.config, len(input_ids)
        if len(position_ids) != n_decode or len(seq_ids) != n_decode:
            raise ValueError(
                f"{n_decode} input_ids but {len(position_ids)} position_ids and {len(seq_ids)} seq_ids"
            )
        if len(prompt_seq_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_seq_ids)} prompt_seq_ids")
        self._check_rows([*seq_ids, *prompt_seq_ids], sampling)
        if n_decode:
            if min(position_ids) < 0 or max(position_ids) >= cfg.seq_len:
                raise ValueError(
                    f"position_ids must lie in [0, seq_len={cfg.seq_len}), got {list(position_ids)}"
                )
            self._check_ids(input_ids)
        for prompt in prompts:
            if not prompt:
                raise ValueError("empty prompt")
            if len(prompt) > cfg.max_context_length:  # = the largest prefill bucket
                raise ValueError(
                    f"prompt of {len(prompt)} tokens exceeds max_context_length={cfg.max_context_length}"
                )
            self._check_ids(prompt)

    def _check_rows(self, seq_ids: Sequence[int], sampling: torch.Tensor | None) -> None:
        slots, n = self.config.batch_size, len(seq_ids)
        if n == 0:
            raise ValueError("need at least one row")
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


def _padded(values: list[int], size: int, fill: int) -> list[int]:
    return [*values, *[fill] * (size - len(values))]


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Consecutive groups of indices whose lengths sum to at most `capacity` (each length fits alone)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if used + n > capacity:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _chunks(rows: Sequence[int], size: int) -> list[list[int]]:
    rows = list(rows)
    return [rows[i : i + size] for i in range(0, len(rows), size)]
