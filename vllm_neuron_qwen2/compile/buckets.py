"""Buckets: the static shapes graphs are built for, and the choice of the smallest one that fits a step."""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

from ..config import NeuronConfig

SCORE_TOKENS = 128
# Beyond the smallest context, prefill graphs come in three sizes only: steps there are mostly whole chunks of
# a long prompt (the largest size), its last piece or a chat turn (a quarter), or host-sampled decode rows
# (the smallest). Attention dominates at long contexts, so the context bucket matters more than the tokens.
LONG_CONTEXT_PREFILL_SIZES = 3
# The largest prefill sizes at the smallest context (those of at least half of it) come twice: packed, and
# without key room for the chunks of several sequences, for a step of one prompt's chunk (a 440-token prompt:
# 544 keys rather than 1056, 19% less time in bf16 on AMX, 6% in float32).
UNPACKED_TWINS = 2


class Bucket(NamedTuple):
    rows: int  # decode rows, each attending its own blocks; also the rows of logits out
    tokens: int  # prompt-chunk tokens (0: a decode graph), attending the step's key blocks
    context: int  # KV positions a decode row attends: its block table's width x block_size
    sample: bool  # sample in the graph (token ids out) instead of returning logits
    scores: bool = False  # logits of every token (prompt logprobs), not of each row's last one
    row_tokens: int = 1  # tokens per decode row: 1, or 1 + the drafts a verify graph checks
    packs: bool = True  # key capacity for `tokens` positions beyond `context` (see key_blocks)

    @property
    def kind(self) -> str:
        if self.scores:
            return "score"
        return "verify" if self.row_tokens > 1 else "prefill" if self.tokens else "decode"

    def __str__(self) -> str:
        rows = f"{self.rows}x{self.row_tokens}" if self.row_tokens > 1 else f"{self.rows}"
        if self.scores:
            shape = f"{self.tokens}"
        elif self.tokens:
            shape = f"{rows}+{self.tokens}"
        else:
            shape = rows
        packed = "+packed" if self.kind == "prefill" and self.packs else ""
        return f"{self.kind}[{shape}x{self.context}{'+sample' if self.sample else ''}{packed}]"

    def row_token_count(self) -> int:
        """Tokens of the decode rows, which come first in the graph's inputs."""
        return self.rows * self.row_tokens

    def block_table_rows(self) -> int:
        """Rows of the block_tables input (one, unused, in a score graph, which has no one-token rows)."""
        return max(self.rows, 1)

    def key_blocks(self, block_size: int) -> int:
        """Capacity of the key_blocks input: the padding block, then the blocks of the step's chunk sequences,
        each once (one unused block in a decode graph). `context` positions hold one chunk ending there;
        a graph that `packs` has room for `tokens` more, so that the chunks of several sequences fit too."""
        if not self.tokens:
            return 1
        return 1 + self.context // block_size + (math.ceil(self.tokens / block_size) if self.packs else 0)

    def logit_rows(self) -> int:
        """Scores: every token; verify: every row token (each checks a draft; a prompt chunk's last token
        takes the first of a padding row's); else one per row."""
        return self.tokens if self.scores else self.row_token_count()


def long_context_prefill_lengths(prefill_lengths: list[int]) -> list[int]:
    """The prefill sizes compiled beyond the smallest context: the smallest, the one nearest a quarter of the
    largest, and the largest."""
    quarter = prefill_lengths[min(bisect.bisect_left(prefill_lengths, prefill_lengths[-1] // 4),
                                  len(prefill_lengths) - 1)]  # fmt: skip
    return sorted({prefill_lengths[0], quarter, prefill_lengths[-1]})


def verify_batch_sizes(decode_batch_sizes: list[int]) -> list[int]:
    """Rows of the verify graphs: the fewest and the most decode rows (one sequence speculating alone, or a
    full batch; the rest pad up, which costs a bandwidth-bound step little)."""
    return sorted({decode_batch_sizes[0], decode_batch_sizes[-1]})


def verify_prompt_lengths(prefill_lengths: list[int]) -> list[int]:
    """Prompt tokens of the verify graphs that carry a step's chunks beside its drafts: the largest prefill
    (a long prompt's full chunks) and the one nearest a quarter of it (its last piece, a chat turn)."""
    return long_context_prefill_lengths(prefill_lengths)[-2:]


def all_buckets(config: NeuronConfig) -> list[Bucket]:
    """Every graph a model with this config may run, decode first (the hot path).

    Decode graphs sample in the graph when on_device_sampling is on (else they return logits); a decode step
    with rows sampled on the host runs in the smallest prefill graph instead. A prefill graph carries
    `batch_size` one-token rows (any step has at most that many sequences) and returns logits: prefill steps
    are few and compute-bound, so sampling them on the host costs nothing a second graph per size would save.
    Every context length has decode graphs of every row count, and prefill graphs of every size at the
    smallest context, of LONG_CONTEXT_PREFILL_SIZES sizes beyond it. Prefill graphs pack (key room for a
    step's chunks of several sequences) at the smallest context, where short prompts share steps, and at the
    largest, which must hold any step; between, a chunk's attention skips that room (a 512-token chunk at
    4096 attends 4096 keys, not 4608), and a packed step that needs it runs in the next context. The
    UNPACKED_TWINS largest sizes at the smallest context (of at least half of it) come without key room
    too, for one prompt's chunk.
    One score graph returns the logits of every token of up to SCORE_TOKENS prompt tokens at the longest
    context, for prompt logprobs. With speculation, verify graphs (1 + speculation_length tokens per row)
    sample each row token, checking the row's drafts: at each context, for the fewest and the most decode
    rows, and with the prompt chunks of a step beside its drafts, two sizes (`verify_prompt_lengths`).
    """
    decode = [
        Bucket(rows, 0, context, config.on_device_sampling)
        for context in config.context_lengths
        for rows in config.decode_batch_sizes
    ]
    long_sizes = long_context_prefill_lengths(config.prefill_lengths)
    last, smallest = len(config.context_lengths) - 1, config.context_lengths[0]
    prefill = [
        Bucket(config.batch_size, tokens, context, False, packs=i in (0, last))
        for i, context in enumerate(config.context_lengths)
        for tokens in (config.prefill_lengths if i == 0 else long_sizes)
    ]
    prefill += [
        Bucket(config.batch_size, tokens, smallest, False, packs=False)
        for tokens in config.prefill_lengths[-UNPACKED_TWINS:]
        if tokens >= smallest // 2  # else the key room is too small a part of the keys to pay for a graph
    ]
    score_tokens = min(SCORE_TOKENS, config.prefill_lengths[-1])
    score = Bucket(0, score_tokens, config.context_lengths[-1], False, True)
    q_len = 1 + config.speculation_length
    verify = [
        Bucket(rows, tokens, context, True, row_tokens=q_len)
        for context in config.context_lengths
        for rows, tokens in [
            *((rows, 0) for rows in verify_batch_sizes(config.decode_batch_sizes)),
            *((config.batch_size, tokens) for tokens in verify_prompt_lengths(config.prefill_lengths)),
        ]
    ]
    return decode + (verify if config.speculation_length else []) + prefill + [score]


def describe(buckets: list[Bucket]) -> str:
    """One line: how many graphs of which kind and shapes (what a user pays in compile time and memory)."""
    decode = [b for b in buckets if b.kind == "decode"]
    verify = [b for b in buckets if b.kind == "verify"]
    prefill = [b for b in buckets if b.kind == "prefill"]
    score = [b for b in buckets if b.kind == "score"]

    def sizes(values: set[int]) -> str:
        return ",".join(map(str, sorted(values)))

    parts = []
    if decode:
        variant = "in-graph sampling" if decode[0].sample else "logits"
        parts.append(
            f"{len(decode)} decode (rows {sizes({b.rows for b in decode})} x context "
            f"{sizes({b.context for b in decode})}, {variant})"
        )
    if verify:
        with_prompt = [b for b in verify if b.tokens]
        parts.append(
            f"{len(verify)} verify ({verify[0].row_tokens} tokens per row: 1 + drafts, rows "
            f"{sizes({b.rows for b in verify if not b.tokens})}; {len(with_prompt)} also with "
            f"{sizes({b.tokens for b in with_prompt})} prompt tokens)"
        )
    if prefill:
        smallest = prefill[0].context
        by_context, unpacked = {}, {b.tokens for b in prefill if b.context == smallest and not b.packs}
        for b in prefill:
            by_context.setdefault(b.context, set()).add(b.tokens)
        ladders = "; ".join(f"context {c}: {sizes(t)}" for c, t in by_context.items())
        if unpacked:
            ladders += f"; {sizes(unpacked)} also unpacked at context {smallest}"
        parts.append(f"{len(prefill)} prefill (prompt tokens + {prefill[0].rows} rows, {ladders})")
    if score:
        parts.append(f"{len(score)} score ({score[0].tokens} prompt tokens, for prompt logprobs)")
    return f"{len(buckets)} bucket graphs: " + ", ".join(parts)


def smallest_fitting(sizes: list[int], needed: int, what: str, field: str) -> int:
    """The smallest bucket size >= needed; a clear error when even the largest is too small."""
    i = bisect.bisect_left(sizes, needed)
    if i == len(sizes):
        raise ValueError(
            f"{what} {needed} exceeds the largest bucket {sizes[-1]} (neuron_config.{field}={sizes})"
        )
    return sizes[i]


def smallest_prefill(
    buckets: list[Bucket], tokens: int, context: int, key_blocks: int, block_size: int
) -> Bucket | None:
    """Of `buckets` (with prompt tokens), the one of the smallest context, then the fewest tokens, then the
    fewest keys, that fits a step of `tokens` prompt tokens, rows attending up to `context` positions and
    `key_blocks` key blocks; None if none does."""
    fitting = [
        b
        for b in buckets
        if b.tokens >= tokens and b.context >= context and b.key_blocks(block_size) >= key_blocks
    ]
    return min(fitting, key=lambda b: (b.context, b.tokens, b.key_blocks(block_size)), default=None)
