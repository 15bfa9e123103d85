"""Model runner: vLLM scheduler steps -> paged rows (tokens, start, block table) -> graph calls -> tokens.

`execute_model` forgets finished requests, admits new ones (possibly with a prefix-cache hit) and follows the
block tables vLLM's block pool hands out (appended blocks, or a new table for a request resumed after
preemption). `sample_tokens(grammar_output)`, which brings the grammar bitmask, runs every scheduled chunk as
one model step: a decode graph when every row has one token, else a prefill graph that packs the prompt
chunks and carries the one-token rows. Rows of requests that ask for prompt logprobs run in the score graph
instead, which returns every position's logits. A row whose chunk does not reach the end of its prompt yields
no token. A row is sampled inside the graph when its parameters allow it (greedy, temperature, top-k, top-p,
seed, penalties, and token masks: a grammar, allowed_token_ids, bad_words and min_tokens, one bitmask); any
other row (logprobs, min_p, logit_bias) makes the step return logits, and is sampled on the host by vLLM's
Sampler after its grammar bitmask is applied.
With n-gram speculation, a step whose rows carry drafts runs in a verify graph, which samples after each
draft and carries the step's prompt chunks; a row keeps its drafts up to
the first one not sampled (speculation.py), and the proposer drafts the next step's tokens from each
sequence.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed import get_tp_group
from vllm.sampling_params import SamplingParams, SamplingType
from vllm.v1.outputs import (
    EMPTY_MODEL_RUNNER_OUTPUT,
    DraftTokenIds,
    LogprobsLists,
    LogprobsTensors,
    ModelRunnerOutput,
)
from vllm.v1.sample.logits_processor import BatchUpdate, build_logitsprocs
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import Sampler

from .model.sampling import Penalties, PenaltyRow, all_tokens_bitmask, mask_disallowed, pack_bitmask
from .model.sampling import sample as sample_in_graph_style
from .speculation import DraftProposer, NgramProposer, accepted_tokens

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import CachedRequestData, GrammarOutput, NewRequestData, SchedulerOutput

    from .vllm_model import NeuronQwen2ForVLLM


@dataclass
class _Request:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]  # vLLM's block table for this request (one KV-cache group)
    # vLLM 0.32 does not send sampled tokens back to the worker, so we keep them. Logits processors hold a
    # reference to this very list.
    output: list[int] = field(default_factory=list)
    # Prompt logprobs not yet returned (None: not asked, or done), filled chunk by chunk.
    prompt_logprobs: LogprobsTensors | None = None

    @classmethod
    def admit(cls, new: NewRequestData, vocab_size: int) -> _Request:
        params = new.sampling_params
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        req = cls(new.req_id, list(new.prompt_token_ids), params, generator, list(new.block_ids[0]))
        if params.prompt_logprobs is not None and len(req.prompt) > 1:
            width = 1 + (vocab_size if params.prompt_logprobs == -1 else params.prompt_logprobs)
            req.prompt_logprobs = LogprobsTensors.empty_cpu(len(req.prompt) - 1, width)
        return req

    def chunk(self, start: int, length: int) -> list[int]:
        """Tokens start .. start + length of prompt + output (the ones vLLM scheduled this step)."""
        tokens = (self.prompt + self.output)[start : start + length]
        if len(tokens) != length:
            raise RuntimeError(
                f"request {self.req_id}: {length} tokens scheduled from position {start}, "
                f"but only {len(self.prompt) + len(self.output)} are known"
            )
        return tokens

    def can_sample_in_graph(self) -> bool:
        """True when only greedy/temperature/top-k/top-p/seed, token masks (a grammar, allowed_token_ids,
        bad_words, min_tokens: `allowed_tokens`) and penalties apply to this row's next token."""
        p = self.params
        return not (p.logprobs is not None or p.min_p > 0.0 or p.logit_bias)

    def penalties_after_each(self, drafts: list[int]) -> list[PenaltyRow] | None:
        """This row's penalties after its output, then after each of `drafts` in turn (1 + len(drafts) rows;
        vLLM's rejection sampler counts the drafts before a position as output); None without any."""
        p = self.params
        if p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
            return None
        factors = (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        output, rows = Counter(self.output), []
        for token in [None, *drafts]:
            if token is not None:
                output[token] += 1
            beyond_prompt = sorted(t for t in output if t not in self.prompt_set)
            repeated = torch.cat([self.prompt_tokens, torch.tensor(beyond_prompt, dtype=torch.int64)])
            rows.append(PenaltyRow(factors, repeated, dict(sorted(output.items()))))
        return rows

    @cached_property
    def prompt_set(self) -> frozenset[int]:
        return frozenset(self.prompt)

    @cached_property
    def prompt_tokens(self) -> torch.Tensor:
        """The prompt's distinct tokens, sorted, which every step's penalties list."""
        return torch.tensor(sorted(self.prompt_set), dtype=torch.int64)

    def allowed_tokens(self, ahead: list[int], vocab_size: int) -> torch.Tensor | None:
        """[vocab] bool: the tokens allowed_token_ids, bad_words and min_tokens leave this row after its
        output and then `ahead` (drafts), as vLLM's Sampler and rejection sampler mask them; None: all."""
        p, past = self.params, self.output + ahead
        banned = list(p.all_stop_token_ids) if len(past) < p.min_tokens else []
        for word in p.bad_words_token_ids or ():  # banned when the tokens before it end the output
            if len(word) <= len(past) + 1 and past[len(past) - len(word) + 1 :] == word[:-1]:
                banned.append(word[-1])
        if not banned and not p.allowed_token_ids:
            return None
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        if p.allowed_token_ids:
            allowed[:] = False
            allowed[p.allowed_token_ids] = True
        allowed[banned] = False
        return allowed

    def sampling_row(self) -> list[float]:
        """(temperature, top_k, top_p, uniform) for the in-graph sampler; temperature 0 means greedy."""
        p = self.params
        if p.sampling_type == SamplingType.GREEDY:
            return [0.0, 0.0, 1.0, 0.0]
        uniform = torch.rand((), generator=self.generator).item()
        return [p.temperature, float(max(p.top_k, 0)), p.top_p, uniform]


@dataclass
class _Step:
    """A model step's graph results, before the host picks the tokens."""

    reqs: list[_Request]  # rows, in scheduler order
    emits: list[bool]  # the row's chunk reaches the end of its known tokens: it yields a token
    in_graph: list[bool]  # the row samples as the graph does (else vLLM's Sampler on the host)
    params: torch.Tensor  # [rows, 4] in-graph sampling parameters
    token_bitmask: torch.Tensor | None  # [rows, words]: the tokens a row may sample
    penalties: Penalties | None  # the rows' penalties (model/sampling.py)
    # token ids [rows] when the graph sampled every row (a verify graph: [rows, 1 + drafts] after each row
    # token), else logits [rows, vocab]
    result: torch.Tensor
    prompt_logprobs: dict[str, LogprobsTensors]  # requests whose prompt logprobs are complete
    drafts: list[list[int]] | None = None  # each row's drafts in a verify step


class NeuronQwen2ModelRunner:
    def __init__(self, vllm_config: VllmConfig, model: NeuronQwen2ForVLLM) -> None:
        self.decoder = model.decoder
        self.neuron_config = model.neuron_config
        self.vocab_size = self.decoder.vocab_size
        self.sampler = Sampler(logprobs_mode=vllm_config.model_config.logprobs_mode)
        self.logitsprocs = build_logitsprocs(
            vllm_config,
            torch.device("cpu"),
            is_pin_memory=False,
            is_pooling_model=False,
            custom_logitsprocs=vllm_config.model_config.logits_processors or (),
        )
        # `--logits-processors` run on the host only, so with any of them every row is sampled there
        custom = bool(vllm_config.model_config.logits_processors)
        self.graph_samples = self.neuron_config.on_device_sampling and not custom
        # TP over processes (the cpu backend) runs every step on every rank. Held from the start: an engine
        # that shares this process may tear vLLM's global groups down.
        self.tp_group = get_tp_group() if self.decoder.decoder.tp.group is not None else None
        self.requests: dict[str, _Request] = {}
        self._logitsprocs_rows: list[str] = []  # request id per row, as the logits processors last saw it
        self._scheduled: tuple[SchedulerOutput, dict[str, int]] | None = None  # for sample_tokens to run
        spec = vllm_config.speculative_config
        self.proposer: DraftProposer | None = None
        if spec is not None:
            self.proposer = NgramProposer(
                spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max
            )
            if self.decoder.decoder.tp.rank == 0:
                logger.info(
                    "speculative decoding: n-gram drafts, up to %d per row (n-grams of %d to %d tokens), "
                    "checked in verify graphs of %d tokens per row (with the step's prompt chunks); while "
                    "a request sampled on the host (logprobs) runs, no row drafts",
                    spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max,
                    1 + self.neuron_config.speculation_length,
                )  # fmt: skip
        self.max_model_len = vllm_config.model_config.max_model_len
        self._proposed: dict[str, list[int]] = {}  # drafts for each row of the last step
        self.steps = 0
        self.step_seconds = 0.0  # in execute_model and sample_tokens, graph calls included

    def execute_model(
        self, scheduler_output: SchedulerOutput, intermediate_tensors: None = None
    ) -> ModelRunnerOutput | None:
        """Take the step's requests and block tables; `sample_tokens` runs the graphs (it has the grammar
        bitmask, an input of the graphs that sample) and hands the output over.

        `intermediate_tensors` (pipeline parallelism, refused) is passed by vLLM 0.16's Ray workers."""
        began = time.perf_counter()
        so = scheduler_output
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        starts = {new.req_id: new.num_computed_tokens for new in so.scheduled_new_reqs}
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = _Request.admit(new, self.vocab_size)
        self._update_cached(so.scheduled_cached_reqs, starts)
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        self._scheduled = (so, starts)
        self.step_seconds += time.perf_counter() - began
        return None

    def _update_cached(self, cached: CachedRequestData, starts: dict[str, int]) -> None:
        """Block tables and computed-token counts of running requests; a request resumed after preemption
        gets a new block table, and its tokens are recomputed from `num_computed_tokens` on."""
        for i, req_id in enumerate(cached.req_ids):
            req = self.requests[req_id]
            starts[req_id] = cached.num_computed_tokens[i]
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                req.block_ids = list(new_blocks[0])
                # With async scheduling a token sampled after the preemption may be in `output`; vLLM's list
                # is the truth.
                known = cached.all_token_ids.get(req_id)
                outputs = cached.num_output_tokens[i]
                req.output[:] = known[len(req.prompt) :] if known is not None else req.output[:outputs]
            elif new_blocks is not None:
                req.block_ids.extend(new_blocks[0])

    def _run_model(
        self, so: SchedulerOutput, starts: dict[str, int], grammar_output: GrammarOutput | None
    ) -> _Step:
        """One model step over the scheduled chunks. Rows whose request still needs prompt logprobs run in
        the score graph; the rest in one step graph, sampling inside it when every row allows it. Rows that
        emit no token draw no random number (a seeded generator stays where it is)."""
        order = list(so.num_scheduled_tokens)
        reqs = [self.requests[r] for r in order]
        rows = range(len(reqs))
        row_starts = [starts[r] for r in order]
        # a row's drafts (None: none scheduled); vLLM refuses async scheduling with n-gram drafts, so these
        # are the ones take_draft_token_ids handed over, as the scheduler kept them
        drafts = [so.scheduled_spec_decode_tokens.get(r) for r in order]
        chunks = [
            reqs[i].chunk(row_starts[i], 1 if drafts[i] is not None else so.num_scheduled_tokens[order[i]])
            for i in rows
        ]
        emits = [row_starts[i] + len(chunks[i]) == len(reqs[i].prompt) + len(reqs[i].output) for i in rows]
        scored = [i for i in rows if reqs[i].prompt_logprobs is not None]
        stepped = [i for i in rows if reqs[i].prompt_logprobs is None]
        in_graph = [self.graph_samples and (not emits[i] or reqs[i].can_sample_in_graph()) for i in rows]
        # Drafts are checked when every row is sampled in the graph, in a verify graph with the step's prompt
        # chunks; in any other step (a row sampled on the host, chunks whose key blocks need two calls) they
        # count as rejected and the rows decode one token.
        sampled_here = [in_graph[i] and emits[i] for i in rows]
        bitmasks = self._token_bitmasks(so, order, grammar_output, sampled_here, drafts)
        penalties = self._penalties(reqs, sampled_here, drafts)
        if any(drafts) and all(in_graph) and not scored:
            step = self._run_verify(reqs, row_starts, chunks, drafts, emits, bitmasks, penalties)
            if step is not None:
                return step
        bitmask = None if bitmasks is None else bitmasks[:, 0]
        if penalties is not None:
            penalties = Penalties(*(tensor[:, 0] for tensor in penalties))
        params = torch.tensor(
            [reqs[i].sampling_row() if in_graph[i] and emits[i] else [0.0] * 4 for i in rows]
        )
        sampling = params if all(in_graph) and not scored else None

        def run(method: Callable[..., Any], picked: list[int], **kw: Any) -> Any:
            return method(
                tokens=[chunks[i] for i in picked],
                starts=[row_starts[i] for i in picked],
                block_tables=[reqs[i].block_ids for i in picked],
                **kw,
            )

        if sampling is not None:
            result = run(
                self.decoder.step_paged,
                stepped,
                sampling=sampling,
                token_bitmask=bitmask,
                penalties=penalties,
            )
        else:
            result = torch.empty(len(reqs), self.vocab_size)
            if stepped:
                result[stepped] = run(self.decoder.step_paged, stepped)
        done: dict[str, LogprobsTensors] = {}
        if scored:
            for i, scores in zip(scored, run(self.decoder.score_paged, scored), strict=True):
                result[i] = scores[-1]
                if self._add_prompt_logprobs(reqs[i], row_starts[i], scores):
                    done[reqs[i].req_id] = reqs[i].prompt_logprobs
                    reqs[i].prompt_logprobs = None
        return _Step(reqs, emits, in_graph, params, bitmask, penalties, result, done)

    def _token_bitmasks(
        self,
        so: SchedulerOutput,
        order: list[str],
        grammar_output: GrammarOutput | None,
        sampled_here: list[bool],
        drafts: list[list[int] | None],
    ) -> torch.Tensor | None:
        """[rows, 1 + K, words] int32: the tokens each row may sample after each of its tokens; None when
        every row may sample any. A grammar's masks hold for every row (vLLM applies them before its Sampler);
        a request's own (allowed_token_ids, bad_words, min_tokens) for the rows sampled here, as the graph
        samples (vLLM's Sampler applies those itself). vLLM's bitmask holds, in its own request order, 1 +
        the scheduled drafts rows for each request under a grammar, the grammar state after each draft
        (vLLM 0.16 and 0.32 alike)."""
        width = 1 + self.neuron_config.speculation_length
        out = all_tokens_bitmask(len(order) * width, self.vocab_size).view(len(order), width, -1)
        masked = False
        if grammar_output is not None:
            given = torch.from_numpy(grammar_output.grammar_bitmask)
            row_of = {req_id: row for row, req_id in enumerate(order)}
            at = 0
            for req_id in grammar_output.structured_output_request_ids:
                n = 1 + len(so.scheduled_spec_decode_tokens.get(req_id, ()))
                out[row_of[req_id], :n] = given[at : at + n]
                at += n
            masked = True
        for row, req_id in enumerate(order):
            ahead = drafts[row] or []
            for j in range(1 + len(ahead)) if sampled_here[row] else ():
                allowed = self.requests[req_id].allowed_tokens(ahead[:j], self.vocab_size)
                if allowed is not None:
                    out[row, j] &= pack_bitmask(allowed[None])[0]
                    masked = True
        return out if masked else None

    def _penalties(
        self, reqs: list[_Request], sampled_here: list[bool], drafts: list[list[int] | None]
    ) -> Penalties | None:
        """[rows, 1 + K, ...] penalties of the rows sampled here after each of their tokens (vLLM's rejection
        sampler counts the drafts before a position as output); None when no such row has any."""
        width = 1 + self.neuron_config.speculation_length
        listed: list[PenaltyRow | None] = []
        for req, here, ahead in zip(reqs, sampled_here, drafts, strict=True):
            rows = (req.penalties_after_each(ahead or []) if here else None) or []
            listed += rows + [None] * (width - len(rows))
        if not any(listed):
            return None
        return Penalties(*(t.view(len(reqs), width, *t.shape[1:]) for t in Penalties.listed(listed)))

    def _run_verify(
        self,
        reqs: list[_Request],
        starts: list[int],
        chunks: list[list[int]],
        drafts: list[list[int] | None],
        emits: list[bool],
        bitmasks: torch.Tensor | None,
        penalties: Penalties | None,
    ) -> _Step | None:
        """One verify graph call: each decode row's last token and drafts, a fresh draw for every token;
        prompt chunks sampled after their last token when it ends the prompt. None, before any row draws a
        random number, when the chunks do not ride along (see `verify_paged`)."""
        width = 1 + self.neuron_config.speculation_length
        tokens = [c + (d or []) for c, d in zip(chunks, drafts, strict=True)]
        prompts = [i for i, c in enumerate(chunks) if len(c) > 1]
        tables = [r.block_ids for r in reqs]
        if not self.decoder.verify_fits(tokens=tokens, starts=starts, block_tables=tables, chunks=prompts):
            return None
        sampling = torch.zeros(len(reqs), width, 4)
        for i, (req, row) in enumerate(zip(reqs, tokens, strict=True)):
            draws = 1 if i in prompts else len(row)
            if emits[i]:
                sampling[i, :draws] = torch.tensor([req.sampling_row() for _ in range(draws)])
        result = self.decoder.verify_paged(
            tokens=tokens,
            starts=starts,
            block_tables=tables,
            sampling=sampling,
            token_bitmask=bitmasks,
            penalties=penalties,
            chunks=prompts,
        )
        row_drafts = [d or [] for d in drafts]
        return _Step(reqs, emits, [True] * len(reqs), sampling[:, 0], None, None, result, {}, row_drafts)

    def _add_prompt_logprobs(self, req: _Request, start: int, logits: torch.Tensor) -> bool:
        """Score the prompt tokens this chunk predicts (position i predicts token i + 1) into the request's
        table; True when the prompt is complete (vLLM returns the table in that step)."""
        end = min(start + len(logits), len(req.prompt) - 1)
        if end > start:
            mode = self.sampler.logprobs_mode
            scores = logits[: end - start]
            if mode not in ("raw_logits", "processed_logits"):
                scores = self.sampler.compute_logprobs(scores)
            targets = torch.tensor(req.prompt[start + 1 : end + 1])
            width = req.prompt_logprobs.logprobs.shape[1] - 1
            ids, values, ranks = self.sampler.gather_logprobs(scores, width, targets)[:3]
            table = req.prompt_logprobs
            table.logprob_token_ids[start:end] = ids
            table.logprobs[start:end] = values
            table.selected_token_ranks[start:end] = ranks
        return start + len(logits) >= len(req.prompt)

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        """Run the step taken by `execute_model`, pick each emitting row's token (among the tokens its
        grammar allows) and hand the step's output over."""
        if self._scheduled is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        began = time.perf_counter()
        (so, starts), self._scheduled = self._scheduled, None
        step = self._run_model(so, starts, grammar_output)
        self.steps += 1
        tokens, logprobs = self._sample(step)
        if self.tp_group is not None:  # rank 0's tokens win so that all KV caches stay identical
            tokens = self.tp_group.broadcast(tokens, src=0)
        tokens = tokens.tolist()
        order = [req.req_id for req in step.reqs]
        sampled: list[list[int]] = []
        for i, (req, emit) in enumerate(zip(step.reqs, step.emits, strict=True)):
            if not emit:
                new = []
            elif step.drafts is not None:
                new = accepted_tokens(step.drafts[i], tokens[i])
            else:
                new = [tokens[i]]
            req.output.extend(new)
            sampled.append(new)
        if self.proposer is not None:
            self._propose(step.reqs)
        self.step_seconds += time.perf_counter() - began
        return ModelRunnerOutput(
            req_ids=order,
            req_id_to_index={r: i for i, r in enumerate(order)},
            sampled_token_ids=sampled,
            logprobs=_logprobs_lists(order, {order[row]: entry for row, entry in logprobs.items()}),
            prompt_logprobs_dict=step.prompt_logprobs,
        )

    def _propose(self, reqs: list[_Request]) -> None:
        """Drafts for the next step of each row sampled in the graph. While a request sampled on the host
        (logprobs) runs, no row drafts: its logits do not leave a verify graph, so the next step, which
        mostly has the same rows, would not check the drafts, which would only take the scheduler's token
        budget and count as rejected. vLLM's scheduler keeps a grammar row's drafts up to the first its
        grammar refuses."""
        on_host = not self.graph_samples or any(not r.can_sample_in_graph() for r in reqs)
        drafting = [] if on_host else [r for r in reqs if r.output]
        sequences = [r.prompt + r.output for r in drafting]
        rooms = [self.max_model_len - len(seq) for seq in sequences]
        self._proposed = {r.req_id: [] for r in reqs}
        self._proposed |= dict(
            zip([r.req_id for r in drafting], self.proposer.propose(sequences, rooms), strict=True)
        )

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The drafts proposed after the last step, for vLLM's scheduler to schedule (and filter)."""
        if self.proposer is None:
            return None
        return DraftTokenIds(list(self._proposed), list(self._proposed.values()))

    def _sample(self, step: _Step) -> tuple[torch.Tensor, dict[int, tuple[np.ndarray, np.ndarray, int]]]:
        """Token ids [rows] (0 for rows that emit none; a verify step's [rows, 1 + drafts]) and the logprobs
        of the rows that asked for them."""
        if step.drafts is not None or step.result.dim() == 1:  # sampled in the graph
            return step.result, {}
        tokens = torch.zeros(len(step.reqs), dtype=torch.int64)
        rows = range(len(step.reqs))
        bitmask = step.token_bitmask
        fast = [i for i in rows if step.in_graph[i] and step.emits[i]]
        if fast:  # the graph's own sampler, on the host: a row samples the same way whatever its batch mates
            tokens[fast] = sample_in_graph_style(
                step.result[fast],
                step.params[fast],
                self.neuron_config.max_topk,
                None if bitmask is None else bitmask[fast],
                None if step.penalties is None else step.penalties.select(fast),
            )
        host = [i for i in rows if step.emits[i] and not step.in_graph[i]]
        if not host:
            return tokens, {}
        logits = step.result[host]
        if bitmask is not None:
            logits = mask_disallowed(logits, bitmask[host])
        host_tokens, host_logprobs = self._sample_on_host([step.reqs[i] for i in host], logits)
        tokens[host] = host_tokens
        return tokens, {host[row]: entry for row, entry in host_logprobs.items()}

    def _sample_on_host(
        self, reqs: list[_Request], logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, tuple[np.ndarray, np.ndarray, int]]]:
        """vLLM's Sampler with its logits processors (min_p, logit_bias, min_tokens) over `reqs`' logits."""
        self._update_logitsprocs(reqs)
        out = self.sampler(logits, self._sampling_metadata(reqs))
        logprobs: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        if out.logprobs_tensors is not None:
            lists = out.logprobs_tensors.tolists()
            for row, req in enumerate(reqs):
                if req.params.logprobs is not None:
                    width = 1 + self._num_logprobs(req.params)
                    logprobs[row] = (
                        lists.logprob_token_ids[row, :width],
                        lists.logprobs[row, :width],
                        int(lists.sampled_token_ranks[row]),
                    )
        return out.sampled_token_ids[:, 0].long(), logprobs

    def _num_logprobs(self, params: SamplingParams) -> int:
        return self.vocab_size if params.logprobs == -1 else params.logprobs

    def _update_logitsprocs(self, reqs: list[_Request]) -> None:
        """Tell the logits processors which request sits in which row of this host-sampled batch."""
        before = self._logitsprocs_rows
        added = [
            (row, req.params, req.prompt, req.output)
            for row, req in enumerate(reqs)
            if row >= len(before) or before[row] != req.req_id
        ]
        removed = list(range(len(reqs), len(before)))
        update = BatchUpdate(len(reqs), removed, added, []) if added or removed else None
        for proc in self.logitsprocs.all:
            proc.update_state(update)  # also called without changes: min_tokens re-checks output lengths
        self._logitsprocs_rows = [req.req_id for req in reqs]

    def _sampling_metadata(self, reqs: list[_Request]) -> SamplingMetadata:
        params = [r.params for r in reqs]
        vocab = self.vocab_size
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        no_penalties = all(
            p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0
            for p in params
        )
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        num_logprobs = [self._num_logprobs(p) for p in params if p.logprobs is not None]
        allowed_mask = None
        if any(p.allowed_token_ids for p in params):
            allowed_mask = torch.zeros(len(reqs), vocab, dtype=torch.bool)
            for row, p in enumerate(params):
                if p.allowed_token_ids:
                    allowed_mask[row] = True  # True = banned
                    allowed_mask[row, p.allowed_token_ids] = False
        prompt_ids = None
        if not no_penalties:
            width = max(len(r.prompt) for r in reqs)
            prompt_ids = torch.full((len(reqs), width), vocab, dtype=torch.int64)  # padded with vocab_size
            for row, r in enumerate(reqs):
                prompt_ids[row, : len(r.prompt)] = torch.tensor(r.prompt)
        return SamplingMetadata(
            temperature=None
            if all(greedy)
            else torch.tensor([0.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_p=None if all(p.top_p >= 1.0 for p in params) else torch.tensor([p.top_p for p in params]),
            top_k=None if all(k == vocab for k in top_k) else torch.tensor(top_k, dtype=torch.int32),
            generators={row: r.generator for row, r in enumerate(reqs) if r.generator is not None},
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
            no_penalties=no_penalties,
            prompt_token_ids=prompt_ids,
            frequency_penalties=torch.tensor([p.frequency_penalty for p in params]),
            presence_penalties=torch.tensor([p.presence_penalty for p in params]),
            repetition_penalties=torch.tensor([p.repetition_penalty for p in params]),
            output_token_ids=[r.output for r in reqs],
            allowed_token_ids_mask=allowed_mask,
            bad_words_token_ids={
                row: p.bad_words_token_ids for row, p in enumerate(params) if p.bad_words_token_ids
            },
            logitsprocs=self.logitsprocs,
        )


def _logprobs_lists(
    order: list[str], logprobs: dict[str, tuple[np.ndarray, np.ndarray, int]]
) -> LogprobsLists | None:
    """One [rows, width] table in scheduler order; rows without logprobs are padding vLLM never reads."""
    if not logprobs:
        return None
    width = max(ids.shape[0] for ids, _, _ in logprobs.values())
    token_ids = np.zeros((len(order), width), dtype=np.int32)
    values = np.full((len(order), width), -np.inf, dtype=np.float32)
    ranks = np.zeros(len(order), dtype=np.int32)
    for i, req_id in enumerate(order):
        if req_id in logprobs:
            ids, lps, rank = logprobs[req_id]
            token_ids[i, : ids.shape[0]] = ids
            values[i, : lps.shape[0]] = lps
            ranks[i] = rank
    return LogprobsLists(token_ids, values, ranks)
