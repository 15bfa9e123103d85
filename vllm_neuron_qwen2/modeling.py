"""NeuronQwen2ForCausalLM: the standalone API. Steps are planned into padded bucket-graph calls on the host.

model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, NeuronConfig(batch_size=4, seq_len=512))
logits = model.prefill(input_ids=[[...], [...]], seq_ids=[3, 0])                 # [2, vocab]
logits = model.decode(input_ids=[t3, t0], position_ids=[p3, p0], seq_ids=[3, 0])  # [2, vocab]
logits = model.step(input_ids=[t3], position_ids=[p3], seq_ids=[3], prompts=[[...]], prompt_seq_ids=[1])
logits = model.step_paged(tokens=[[t], [...]], starts=[p, 0], block_tables=[[1, 2], [3]])  # paged callers

Slot callers (`seq_ids`) get a fixed run of blocks per slot; paged callers (vLLM's runner) bring their own
block tables, which may share blocks holding a common prefix.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .compile import artifacts
from .compile.backend import build_graphs
from .compile.buckets import (
    Bucket,
    all_buckets,
    describe,
    smallest_fitting,
    smallest_prefill,
    verify_batch_sizes,
)
from .compile.costs import FLOPS_PER_BYTE, RankShape, attention_flops
from .config import NeuronConfig, Qwen2Shape
from .model.graphs import penalty_width
from .model.kv_cache import PADDING_BLOCK
from .model.parallel import TPGroup, has_bf16_units
from .model.qwen2 import Qwen2Decoder
from .model.sampling import Penalties, all_tokens_bitmask, bitmask_words, sample

logger = logging.getLogger(__name__)


class PaddingStats:
    """Real and padded tokens, calls and seconds inside graph calls per bucket: what the bucket choice wastes
    and where a step's time goes (the rest of a serving step is host work)."""

    def __init__(self) -> None:
        self.real: Counter[Bucket] = Counter()
        self.padded: Counter[Bucket] = Counter()
        self.calls: Counter[Bucket] = Counter()
        self.seconds: Counter[Bucket] = Counter()

    def add(self, bucket: Bucket, real: int, seconds: float) -> None:
        total = bucket.tokens or bucket.row_token_count()  # packed prompt-chunk tokens, or row tokens
        self.real[bucket] += real
        self.padded[bucket] += total - real
        self.calls[bucket] += 1
        self.seconds[bucket] += seconds

    @property
    def graph_calls(self) -> int:
        return self.calls.total()

    @property
    def graph_seconds(self) -> float:
        return sum(self.seconds.values())


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
        self.rank_shape = RankShape.of(decoder.shape, config)
        prefill = [b for b in graphs if b.kind == "prefill"]
        self._most_key_blocks = max(b.key_blocks(config.block_size) for b in prefill)

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
        buckets = all_buckets(config)
        if tp.rank == 0:
            logger.info(
                "Qwen2 decoder: %d layers, tp_degree=%d, up to %d sequences x %d tokens, KV pool %d blocks "
                "of %d tokens, %s, backend=%s; %s",
                shape.num_hidden_layers, config.tp_degree, config.batch_size, config.seq_len,
                config.num_blocks, config.block_size, config.dtype, config.backend, describe(buckets),
            )  # fmt: skip
            if config.backend == "cpu" and config.dtype == "bfloat16" and not has_bf16_units():
                logger.warning(
                    "bfloat16 on a CPU without bfloat16 units (no AVX-512 BF16 or AMX): results are as exact "
                    "as elsewhere, but steps run slower than in float32 (--dtype float32)"
                )
        decoder = Qwen2Decoder(shape, config, tp)
        artifacts.load_weights(decoder, model_dir, progress=tp.rank == 0)
        decoder.eval()
        graphs = build_graphs(decoder, config, buckets, model_dir)
        return cls(decoder, config, graphs)

    def slot_blocks(self, slot: int) -> list[int]:
        """The block table of KV slot `slot` for slot callers: its own run of blocks after block 0."""
        first = 1 + slot * self.config.blocks_per_seq
        return list(range(first, first + self.config.blocks_per_seq))

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
        """One serving step over KV slots: slots `seq_ids` each take one token (input_ids at position_ids)
        and whole `prompts` are written into slots `prompt_seq_ids`. Returns logits [rows, vocab] (or sampled
        ids [rows]), the decode rows first, then the prompts. See `step_paged`.
        """
        if len(position_ids) != len(input_ids) or len(seq_ids) != len(input_ids):
            raise ValueError(
                f"{len(input_ids)} input_ids but {len(position_ids)} position_ids and {len(seq_ids)} seq_ids"
            )
        if len(prompt_seq_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_seq_ids)} prompt_seq_ids")
        slots, cfg = [*seq_ids, *prompt_seq_ids], self.config
        if len(set(slots)) != len(slots) or not all(0 <= s < cfg.batch_size for s in slots):
            raise ValueError(
                f"seq_ids must be distinct slots in [0, batch_size={cfg.batch_size}), got {slots}"
            )
        if cfg.num_blocks < 1 + cfg.batch_size * cfg.blocks_per_seq:
            raise ValueError(
                f"slot seq_ids need num_blocks >= {1 + cfg.batch_size * cfg.blocks_per_seq} "
                f"(batch_size full sequences), this model has {cfg.num_blocks}; use step_paged"
            )
        return self.step_paged(
            tokens=[[t] for t in input_ids] + [list(p) for p in prompts],
            starts=[*position_ids, *[0] * len(prompts)],
            block_tables=[self.slot_blocks(s) for s in slots],
            sampling=sampling,
        )

    @torch.no_grad()  # not inference_mode: its tensors cannot enter an XLA device
    def step_paged(
        self,
        *,
        tokens: Sequence[Sequence[int]],
        starts: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        sampling: torch.Tensor | None = None,
        token_bitmask: torch.Tensor | None = None,
        penalties: Penalties | None = None,
    ) -> torch.Tensor:
        """One serving step over paged sequences. Row r continues its sequence with `tokens[r]` at positions
        `starts[r]`, `starts[r] + 1`, ...: their K/V go into the blocks `block_tables[r]` (block ids in
        [1, num_blocks); position p lives in block `block_tables[r][p // block_size]`), and each token
        attends to every position before it in those blocks, written by this or any earlier step. Blocks may
        be shared by rows whose sequences share a prefix, as long as no row writes a shared block.

        Returns the logits of each row's last token [rows, vocab], or, with `sampling` [rows, 4]
        (temperature, top_k, top_p, uniform draw; see model/sampling.py), sampled token ids [rows], each
        among the tokens its row of `token_bitmask` allows ([rows, ceil(vocab / 32)] int32, vLLM's grammar
        bitmask layout; None: any token), after `penalties` (model/sampling.py; None: none).

        One-token rows run in a decode graph. Rows of several tokens (prompt chunks) are packed end to end
        into a prefill graph that also carries the one-token rows, so a step streams the weights once (so do
        one-token rows whose logits are asked for when the decode graphs sample); chunks beyond the largest
        prefill bucket continue in further calls. Each graph attends the smallest context bucket that covers
        its longest row; one-token rows that would lift the chunks into a larger one run in a call of their
        own when that costs less (`_rows_apart`).
        """
        self._check_paged(tokens, starts, block_tables, sampling, token_bitmask, penalties)
        cfg = self.config
        rows = _rows(tokens, starts, block_tables)
        singles = [row for row in rows if len(row.tokens) == 1]
        chunks = [row for row in rows if len(row.tokens) > 1]
        calls = _pack(chunks, cfg.prefill_lengths[-1], self._most_key_blocks, cfg.block_size)
        apart = bool(chunks and singles) and self._rows_apart(singles, calls[0])
        in_decode_graph = sampling is not None or not cfg.on_device_sampling  # it gives what is asked
        sampled: dict[int, torch.Tensor] = {}  # row index -> its token id, sampled in a decode graph
        logits: dict[int, torch.Tensor] = {}  # row index -> its last token's logits [vocab]
        riding = singles  # one-token rows in the first call of `calls`
        if singles and in_decode_graph and (apart or not chunks):
            bucket = self._decode_bucket(singles, cfg.on_device_sampling, row_tokens=1)
            result, _ = self._run(bucket, singles, [], sampling, token_bitmask, penalties)
            if not chunks:
                return result[: len(rows)]  # every row is a single, in order
            decoded = zip((row.index for row in singles), result[: len(singles)], strict=True)
            (sampled if sampling is not None else logits).update(decoded)
            riding = []
        elif apart:
            calls = [[], *calls]  # the rows in a prefill call of their own, before the chunks'
        for call, pieces in enumerate(calls):
            call_singles = riding if call == 0 else []
            result, placed = self._run(self._prefill_bucket(call_singles, pieces), call_singles, pieces)
            ending = [row.index for row, _ in placed if row.last]
            logits.update(zip(ending, result[: len(ending)], strict=True))
        if sampling is None:
            return torch.stack([logits[i] for i in range(len(rows))])
        host = sorted(logits)
        bitmask = None if token_bitmask is None else token_bitmask[host]
        penalized = None if penalties is None else penalties.select(host)
        ids = torch.empty(len(rows), dtype=torch.int64)
        ids[host] = sample(
            torch.stack([logits[i] for i in host]), sampling[host], cfg.max_topk, bitmask, penalized
        )
        for i, token in sampled.items():
            ids[i] = token
        return ids

    @torch.no_grad()
    def verify_paged(
        self,
        *,
        tokens: Sequence[Sequence[int]],
        starts: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        sampling: torch.Tensor,
        token_bitmask: torch.Tensor | None = None,
        penalties: Penalties | None = None,
        chunks: Sequence[int] = (),
    ) -> torch.Tensor | None:
        """Decode rows carrying drafts, checked in one verify graph call. Row r is its last sampled token
        and then up to speculation_length drafts, at positions starts[r], starts[r] + 1, ...; a token is
        sampled after each of them, with sampling [rows, Q, 4] (a draw per token), Q = 1 + speculation_length,
        among the tokens token_bitmask [rows, Q, ceil(vocab / 32)] allows there (None: any), after the
        penalties there (factors [rows, Q, 2], token sets [rows, Q, 2, ceil(vocab / 32)]). Returns them
        [rows, Q] (entries past a row's tokens are padding). Draft j + 1 is accepted when token j
        equals it and every draft before it was accepted: one-hot drafts accepted with the target's
        probability of the draft, a rejected one replaced by a sample of the target without it, as
        rejection sampling does. All K/V the rows write stays; a caller overwrites rejected positions.

        The rows numbered in `chunks` are prompt chunks instead, of any length, sampled after their last
        token only (with sampling[r, 0], returned at [r, 0]). They ride along in the verify graph with the
        fewest prompt tokens that fits them; when their key blocks fit no single call, this returns None
        (step without the drafts)."""
        self._check_paged(tokens, starts, block_tables)
        cfg, q_len = self.config, 1 + self.config.speculation_length
        if not cfg.speculation_length:
            raise ValueError("verify_paged needs neuron_config.speculation_length >= 1 (verify graphs)")
        rows = _rows(tokens, starts, block_tables)
        drafting = [row for i, row in enumerate(rows) if i not in chunks]
        if max(len(row.tokens) for row in drafting) > q_len:
            raise ValueError(
                f"verify rows take 1 to {q_len} tokens, got rows of {[len(row.tokens) for row in drafting]}"
            )
        self._check_sampling((len(rows), q_len), sampling, token_bitmask, penalties)
        bucket = self._verify_bucket(rows, chunks)
        if bucket is None:
            return None
        pieces = [rows[i] for i in chunks]
        result, placed = self._run(bucket, drafting, pieces, sampling, token_bitmask, penalties)
        out = torch.zeros(len(rows), q_len, dtype=torch.int64)
        out[[row.index for row, _ in placed]] = result.view(bucket.rows, q_len)[: len(placed)]
        return out

    def verify_fits(
        self,
        *,
        tokens: Sequence[Sequence[int]],
        starts: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        chunks: Sequence[int] = (),
    ) -> bool:
        """Whether `verify_paged` takes these rows (its prompt chunks ride along) rather than returning
        None: asked before drawing the rows' random numbers, which a step without drafts draws again."""
        self._check_paged(tokens, starts, block_tables)
        return self._verify_bucket(_rows(tokens, starts, block_tables), chunks) is not None

    @torch.no_grad()
    def score_paged(
        self, *, tokens: Sequence[Sequence[int]], starts: Sequence[int], block_tables: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Like `step_paged` without sampling, but returns the logits of every token of each row: a
        [len(tokens[r]), vocab] tensor per row (prompt logprobs). Runs in the score graph, in as many calls
        as the rows' tokens need."""
        self._check_paged(tokens, starts, block_tables)
        (bucket,) = [b for b in self.graphs if b.scores]
        rows = _rows(tokens, starts, block_tables)
        out: list[list[torch.Tensor]] = [[] for _ in rows]
        bs = self.config.block_size
        for pieces in _pack(rows, bucket.tokens, bucket.key_blocks(bs), bs):
            result, placed = self._run(bucket, [], pieces)
            for piece, first in placed:
                out[piece.index].append(result[first : first + len(piece.tokens)])
        return [torch.cat(parts) for parts in out]

    def _decode_bucket(self, rows: list[_Row], sample: bool, row_tokens: int) -> Bucket:
        """The decode (or verify) bucket of the fewest rows and the smallest context that fit `rows`."""
        cfg = self.config
        sizes = cfg.decode_batch_sizes if row_tokens == 1 else verify_batch_sizes(cfg.decode_batch_sizes)
        batch = smallest_fitting(sizes, len(rows), "decode rows", "decode_batch_sizes")
        longest = max(r.end for r in rows)
        context = smallest_fitting(cfg.context_lengths, longest, "context", "context_lengths")
        return Bucket(batch, 0, context, sample, row_tokens=row_tokens)

    def _prefill_bucket(self, singles: list[_Row], pieces: list[_Row]) -> Bucket:
        """The prefill bucket of the smallest context, then the fewest tokens, that fits one call."""
        cfg = self.config
        tokens = sum(len(p.tokens) for p in pieces)
        context = max(r.end for r in [*singles, *pieces])
        key_blocks = len(_key_blocks(pieces, cfg.block_size))
        prefill = [b for b in self.graphs if b.kind == "prefill"]
        bucket = smallest_prefill(prefill, tokens, context, key_blocks, cfg.block_size)
        if bucket is None:
            raise ValueError(
                f"no prefill graph fits {tokens} prompt tokens, a context of {context} and {key_blocks} key "
                "blocks (neuron_config.prefill_lengths and context_lengths)"
            )
        return bucket

    def _rows_apart(self, singles: list[_Row], pieces: list[_Row]) -> bool:
        """Whether one-token rows that reach further than a call's prompt pieces run in a call of their own:
        when the attention the pieces save in a smaller context outweighs streaming the weights once more
        (on a CPU nearly always; on a NeuronCore only for long contexts)."""
        together, alone = self._prefill_bucket(singles, pieces), self._prefill_bucket([], pieces)
        if alone.context == together.context:
            return False
        bs, rank = self.config.block_size, self.rank_shape
        rows = self._decode_bucket(singles, sample=False, row_tokens=1)
        saved = attention_flops(together, rank, bs) - attention_flops(alone, rank, bs)
        saved -= attention_flops(rows, rank, bs)
        return saved > rank.weights * FLOPS_PER_BYTE[self.config.backend]

    def _verify_bucket(self, rows: list[_Row], chunks: Sequence[int]) -> Bucket | None:
        """The verify bucket of these rows, the ones numbered in `chunks` being prompt chunks."""
        drafting = [row for i, row in enumerate(rows) if i not in chunks]
        if not chunks:
            return self._decode_bucket(drafting, sample=True, row_tokens=1 + self.config.speculation_length)
        return self._verify_bucket_with_prompt(drafting, [rows[i] for i in chunks])

    def _verify_bucket_with_prompt(self, drafting: list[_Row], pieces: list[_Row]) -> Bucket | None:
        """The verify graph with prompt tokens of the smallest context, then the fewest tokens, that fits
        these rows and prompt chunks in one call; None if their key blocks need more than one."""
        bs = self.config.block_size
        tokens = sum(len(p.tokens) for p in pieces)
        candidates = [b for b in self.graphs if b.kind == "verify" and b.tokens]
        context = max(r.end for r in [*drafting, *pieces])
        return smallest_prefill(candidates, tokens, context, len(_key_blocks(pieces, bs)), bs)

    def _run(
        self,
        bucket: Bucket,
        singles: list[_Row],
        pieces: list[_Row],
        sampling: torch.Tensor | None = None,
        token_bitmask: torch.Tensor | None = None,
        penalties: Penalties | None = None,
    ) -> tuple[torch.Tensor, list[tuple[_Row, int]]]:
        """Run one bucket graph over decode rows and prompt pieces, padded to the bucket's shapes (padding
        tokens write into block 0 and read it). Returns the graph's result, one row per row that ends in
        this call (for a score bucket, per token; for a verify bucket, per row token), and where each row's
        tokens were placed."""
        bs, width = self.config.block_size, bucket.context // self.config.block_size
        ids, positions, slots, placed = [], [], [], []

        def place(row: _Row, pad_to: int) -> None:
            placed.append((row, len(ids)))
            ids.extend(row.tokens)
            positions.extend(range(row.start, row.end))
            slots.extend(row.blocks[p // bs] * bs + p % bs for p in range(row.start, row.end))
            pad = pad_to - len(ids)
            ids.extend([0] * pad)
            positions.extend([0] * pad)
            slots.extend([PADDING_BLOCK * bs] * pad)

        tables = [[*r.blocks[:width], *[PADDING_BLOCK] * (width - len(r.blocks))] for r in singles]
        tables += [[PADDING_BLOCK] * width] * (bucket.block_table_rows() - len(singles))
        for row in singles:
            place(row, len(ids) + bucket.row_tokens)
        place(_Row(-1, [], 0, []), bucket.row_token_count())  # padding rows
        # The chunks' key blocks, each once (the padding block first: padding tokens read it) and which
        # tokens may read each.
        keys = _key_blocks(pieces, bs)
        column = {block: i for i, block in enumerate(keys)}
        visible = torch.zeros(max(bucket.tokens, 1), bucket.key_blocks(bs), dtype=torch.bool)
        visible[:, 0] = True
        for piece in pieces:
            first = len(ids) - bucket.row_token_count()
            place(piece, len(ids) + len(piece.tokens))
            visible[first : first + len(piece.tokens), 0] = False
            visible[first : first + len(piece.tokens), [column[b] for b in piece.key_blocks(bs)]] = True
        place(_Row(-1, [], 0, []), bucket.row_token_count() + bucket.tokens)  # padding tokens
        key_blocks = _padded(list(keys), bucket.key_blocks(bs), PADDING_BLOCK)
        key_starts = _padded(list(keys.values()), bucket.key_blocks(bs), 0)

        placed = [(row, first) for row, first in placed if row.index >= 0]
        if bucket.scores:  # every token
            logit_index = list(range(bucket.logit_rows()))
        elif bucket.kind == "verify":  # every row token; a prompt chunk's last one in a padding row's place
            logit_index = list(range(bucket.logit_rows()))
            for slot, (row, first) in enumerate(placed[len(singles) :], start=len(singles)):
                logit_index[slot * bucket.row_tokens] = first + len(row.tokens) - 1
        else:  # each row ending here: its last token
            logit_index = [first + len(row.tokens) - 1 for row, first in placed if row.last]
        # per row [rows, ...], or a verify call's [rows, Q, ...]: one entry per logit row
        ending = [row.index for row, _ in placed if row.last]
        padding = (
            torch.zeros(bucket.logit_rows(), 4),
            all_tokens_bitmask(bucket.logit_rows(), self.vocab_size),
            *Penalties.none(bucket.logit_rows(), penalty_width(bucket, self.vocab_size)),
        )
        given_penalties = (None,) * len(Penalties._fields) if penalties is None else penalties
        for given, padded in zip((sampling, token_bitmask, *given_penalties), padding, strict=True):
            if given is not None:
                picked = given[ending].flatten(0, given.dim() - padded.dim())
                if picked.shape[-1] > padded.shape[-1]:  # tokens: a row's distinct ones fit its context
                    if (picked[..., padded.shape[-1] :] >= 0).any():
                        raise ValueError(
                            f"penalties list more than {padded.shape[-1]} distinct tokens for a row of at "
                            f"most {bucket.context} positions"
                        )
                    picked = picked[..., : padded.shape[-1]]
                padded[: len(picked), ..., : picked.shape[-1]] = picked
        began = time.perf_counter()
        result = self.graphs[bucket](
            torch.tensor(ids),
            torch.tensor(positions),
            torch.tensor(slots),
            torch.tensor(tables),
            torch.tensor(key_blocks),
            torch.tensor(key_starts) * bs,
            visible,
            torch.tensor(_padded(logit_index, bucket.logit_rows(), 0)),
            *padding,
        )
        real = sum(len(row.tokens) for row in (pieces if bucket.tokens else singles))
        self.padding.add(bucket, real, time.perf_counter() - began)
        return result, placed

    def _check_paged(self, tokens, starts, block_tables, sampling=None, token_bitmask=None, penalties=None):
        cfg, n = self.config, len(tokens)
        if len(starts) != n or len(block_tables) != n:
            raise ValueError(f"{n} token rows but {len(starts)} starts and {len(block_tables)} block tables")
        if not 1 <= n <= cfg.batch_size:
            raise ValueError(f"a step takes 1 to batch_size={cfg.batch_size} rows, got {n}")
        for row, start, blocks in zip(tokens, starts, block_tables, strict=True):
            if not row:
                raise ValueError("empty prompt")
            end = start + len(row)
            if start < 0 or end > cfg.seq_len:
                raise ValueError(f"positions {start}..{end - 1} must lie in [0, seq_len={cfg.seq_len})")
            if len(blocks) < math.ceil(end / cfg.block_size):
                raise ValueError(
                    f"a row reaching position {end - 1} needs {math.ceil(end / cfg.block_size)} blocks "
                    f"of {cfg.block_size}, its block table has {len(blocks)}"
                )
            if not all(0 < b < cfg.num_blocks for b in blocks):
                raise ValueError(
                    f"block ids must lie in [1, num_blocks={cfg.num_blocks}), got {list(blocks)}"
                )
            if min(row) < 0 or max(row) >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size})")
        if sampling is not None:
            self._check_sampling((n,), sampling, token_bitmask, penalties)
        elif token_bitmask is not None or penalties is not None:
            raise ValueError("token_bitmask= and penalties= go beside sampling=")

    def _check_sampling(self, rows: tuple[int, ...], sampling, token_bitmask, penalties) -> None:
        """The shapes of what the graphs sample with, for `rows` ([rows] or a verify call's [rows, Q])."""
        if not self.config.on_device_sampling:
            raise ValueError("sampling= needs neuron_config.on_device_sampling=true")
        words = bitmask_words(self.vocab_size)
        expected = {"sampling": (sampling, (*rows, 4)), "token_bitmask": (token_bitmask, (*rows, words))}
        if penalties is not None:
            expected["penalties.factors"] = (penalties.factors, (*rows, 3))
            # a row's distinct tokens, at most one per position
            width = min(penalties.token_ids.shape[-1], self.config.seq_len)
            expected["penalties.token_ids"] = (penalties.token_ids, (*rows, 2, width))
            expected["penalties.counts"] = (penalties.counts, (*rows, width))
        for name, (given, shape) in expected.items():
            if given is not None and tuple(given.shape) != shape:
                raise ValueError(f"{name} must be a {list(shape)} tensor, got {list(given.shape)}")


@dataclass
class _Row:
    """A row's tokens in one graph call: `tokens` at positions start.., into `blocks`; `last` when they end
    the caller's row (its logits are the row's)."""

    index: int
    tokens: list[int]
    start: int
    blocks: Sequence[int]
    last: bool = True

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def key_blocks(self, block_size: int) -> Sequence[int]:
        """The blocks its tokens attend: its sequence's, up to its last token."""
        return self.blocks[: math.ceil(self.end / block_size)]


def _rows(
    tokens: Sequence[Sequence[int]], starts: Sequence[int], block_tables: Sequence[Sequence[int]]
) -> list[_Row]:
    return [_Row(r, list(t), s, block_tables[r]) for r, (t, s) in enumerate(zip(tokens, starts, strict=True))]


def _padded(values: list[int], size: int, fill: int) -> list[int]:
    return [*values, *[fill] * (size - len(values))]


def _key_blocks(pieces: list[_Row], block_size: int) -> dict[int, int]:
    """The key blocks of a call's prompt pieces, each once, in order, the padding block first: block id ->
    its index in its sequence (shared prefix blocks have the same one in every sequence)."""
    keys = {PADDING_BLOCK: 0}
    for piece in pieces:
        for i, block in enumerate(piece.key_blocks(block_size)):
            keys.setdefault(block, i)
    return keys


def _pack(
    chunks: list[_Row], tokens_per_call: int, blocks_per_call: int, block_size: int
) -> list[list[_Row]]:
    """Split the chunks, in order, into calls of at most `tokens_per_call` tokens that attend at most
    `blocks_per_call` key blocks; a chunk that does not fit what is left of a call continues in the next."""
    calls: list[list[_Row]] = [[]]
    free = tokens_per_call
    for chunk in chunks:
        at = 0
        while at < len(chunk.tokens):
            take = min(len(chunk.tokens) - at, free)
            end = at + take
            piece = _Row(
                chunk.index, chunk.tokens[at:end], chunk.start + at, chunk.blocks, end == len(chunk.tokens)
            )
            if take and len(_key_blocks([*calls[-1], piece], block_size)) <= blocks_per_call:
                calls[-1].append(piece)
                free -= take
                at = end
            elif calls[-1]:
                calls.append([])
                free = tokens_per_call
            else:
                raise ValueError(f"a prompt piece needs more than {blocks_per_call} key blocks")
    return calls
