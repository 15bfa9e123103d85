"""The benchmark workloads (prompts as token ids, the same for every engine) and their cached checkpoint."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Prompt ids are drawn from the tiny tokenizer's byte-level BPE vocabulary (below its special tokens), so
# every engine accepts them and vLLM can detokenize them.
PROMPT_VOCAB = 450


@dataclass(frozen=True)
class Workload:
    """`requests` prompts: a `shared_prefix`-token prefix (the same ids in every prompt, like a chat's
    system prompt) plus `min_prompt`-`max_prompt` tokens of their own; `output_tokens` generated each."""

    name: str = "default"
    layers: int = 8
    requests: int = 32
    min_prompt: int = 16
    max_prompt: int = 200
    output_tokens: int = 64
    shared_prefix: int = 0
    max_num_seqs: int = 8
    max_model_len: int = 512
    seed: int = 0

    def prompts(self) -> list[list[int]]:
        """The prompts, own lengths uniform in [min_prompt, max_prompt]; seeded, so every call agrees."""
        rng = random.Random(self.seed)
        prefix = [rng.randrange(PROMPT_VOCAB) for _ in range(self.shared_prefix)]
        lengths = [rng.randint(self.min_prompt, self.max_prompt) for _ in range(self.requests)]
        return [prefix + [rng.randrange(PROMPT_VOCAB) for _ in range(n)] for n in lengths]

    def describe(self) -> str:
        prefix = f"a shared {self.shared_prefix}-token prefix + " if self.shared_prefix else ""
        return (
            f"{self.requests} requests, {prefix}{self.min_prompt}-{self.max_prompt} prompt tokens "
            f"(uniform, seed {self.seed}), {self.output_tokens} output tokens each"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Workload:
        return cls(**values)

    def check(self) -> None:
        if not 1 <= self.min_prompt <= self.max_prompt:
            raise SystemExit(f"need 1 <= min_prompt <= max_prompt, got {self.min_prompt}, {self.max_prompt}")
        if self.shared_prefix + self.max_prompt + self.output_tokens + DECODE_EXTRA > self.max_model_len:
            raise SystemExit(
                f"{self.name}: shared_prefix + max_prompt + output_tokens + {DECODE_EXTRA} (the decode-rate "
                f"probe's longest run) must fit max_model_len={self.max_model_len}"
            )


# The workloads; all share max_num_seqs and the checkpoint.
WORKLOADS = {
    "default": Workload(name="default"),
    # chat: one 320-token system prompt for every request, then each request's own message
    "chat": Workload(name="chat", shared_prefix=320, min_prompt=16, max_prompt=48, output_tokens=32),
    # long: prompts near max_model_len, a few output tokens: prefill-bound
    "long": Workload(name="long", min_prompt=300, max_prompt=440, output_tokens=16),
    # long8k: retrieval-sized prompts at --max-model-len 8192: attention over long contexts
    "long8k": Workload(
        name="long8k", requests=16, min_prompt=2048, max_prompt=6144, output_tokens=32, max_model_len=8192
    ),
}


def warmup_prompts(w: Workload) -> list[list[int]]:
    """One full batch of other prompts (another seed: another shared prefix too), so that the warm-up leaves
    vLLM's prefix cache no hit to serve in the timed run."""
    return Workload.from_dict({**w.to_dict(), "seed": w.seed + 1}).prompts()[: w.max_num_seqs]


# The decode-rate probe runs max_num_seqs prompts twice: DECODE_SHORT output tokens, then
# DECODE_SHORT + output_tokens; the difference is pure decode steps at full batch.
DECODE_SHORT = 16
DECODE_EXTRA = DECODE_SHORT


def checkpoint(work_dir: Path, layers: int) -> Path:
    """A random Qwen2-0.5B-like float32 checkpoint with `layers` layers, made once and reused."""
    from vllm_neuron_qwen2.tiny import make_qwen2_05b_like

    return made_once(
        work_dir / f"qwen2-0.5b-like-{layers}L", lambda out: make_qwen2_05b_like(out, layers, seed=0)
    )


def made_once(out: Path, make: Callable[[Path], object]) -> Path:
    """`out`, made by `make(folder)` unless a complete one is there already."""
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    tmp.rename(out)  # only a complete checkpoint gets the final name
    return out


def model_geometry(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())
