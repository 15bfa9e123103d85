"""A custom logits processor, as vLLM's `--logits-processors` loads one
(`custom_logits_processor:OnlyThreeTokens`): only three tokens may follow, whatever the request asks."""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

ALLOWED = [5, 77, 300]


class OnlyThreeTokens(LogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        banned = torch.ones(logits.shape[-1], dtype=torch.bool)
        banned[ALLOWED] = False
        return logits.masked_fill(banned, -torch.inf)
