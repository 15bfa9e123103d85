"""The benchmark workload (prompts as token ids, the same for every engine) and its cached checkpoint."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Prompt ids are drawn from the tiny tokenizer's byte-level BPE vocabulary (below its special tokens), so
# every engine accepts them and vLLM can detokenize them.
PROMPT_VOCAB = 450


@dataclass(frozen=True)
class Workload:
    layers: int = 8
    requests: int = 32
    min_prompt: int = 16
    max_prompt: int = 200
    output_tokens: int = 64
    max_num_seqs: int = 8
    max_model_len: int = 512
    seed: int = 0

    def prompts(self) -> list[list[int]]:
        """`requests` prompts, lengths uniform in [min_prompt, max_prompt]; seeded, so every call agrees."""
        rng = random.Random(self.seed)
        lengths = [rng.randint(self.min_prompt, self.max_prompt) for _ in range(self.requests)]
        return [[rng.randrange(PROMPT_VOCAB) for _ in range(n)] for n in lengths]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Workload:
        return cls(**values)

    def check(self) -> None:
        if not 1 <= self.min_prompt <= self.max_prompt:
            raise SystemExit(f"need 1 <= min_prompt <= max_prompt, got {self.min_prompt}, {self.max_prompt}")
        if self.max_prompt + self.output_tokens + DECODE_EXTRA > self.max_model_len:
            raise SystemExit(
                f"max_prompt + output_tokens + {DECODE_EXTRA} (the decode-rate probe's longest run) "
                f"must fit max_model_len={self.max_model_len}"
            )


def warmup_prompts(w: Workload) -> list[list[int]]:
    """One full batch of other prompts: a warm-up with them leaves vLLM's prefix cache no hit to serve."""
    return Workload.from_dict({**w.to_dict(), "seed": w.seed + 1}).prompts()[: w.max_num_seqs]


# The decode-rate probe runs max_num_seqs prompts twice: DECODE_SHORT output tokens, then
# DECODE_SHORT + output_tokens; the difference is pure decode steps at full batch.
DECODE_SHORT = 16
DECODE_EXTRA = DECODE_SHORT


def checkpoint(work_dir: Path, layers: int) -> Path:
    """A random Qwen2-0.5B-like float32 checkpoint with `layers` layers, made once and reused."""
    from vllm_neuron_qwen2.tiny import make_qwen2_05b_like

    out = work_dir / f"qwen2-0.5b-like-{layers}L"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_qwen2_05b_like(tmp, num_hidden_layers=layers, seed=0)
    tmp.rename(out)  # only a complete checkpoint gets the final name
    return out


def model_geometry(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())
