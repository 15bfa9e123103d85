"""In-graph sampler: greedy, temperature, top-k and top-p with static shapes; only token ids leave the graph.

Each row's random draw comes in as an input (`uniform`), so seeded requests stay reproducible and the
graph itself holds no RNG state. As on Neuron, sampling looks at the `max_topk` best tokens only.
"""

from __future__ import annotations

import torch

# columns of the [B, 4] float32 sampling tensor
TEMPERATURE, TOP_K, TOP_P, UNIFORM = range(4)
GREEDY_BELOW = 1e-5  # vLLM treats temperature < 1e-5 as greedy


def sample(logits: torch.Tensor, params: torch.Tensor, max_topk: int) -> torch.Tensor:
    """logits [B, V] float32, params [B, 4] -> token ids [B] int64."""
    temperature, top_k, top_p, uniform = params.unbind(-1)
    k_max = min(max_topk, logits.shape[-1])
    top_logits, top_ids = logits.topk(k_max, dim=-1)  # [B, K], best first
    rank = torch.arange(k_max, device=logits.device)[None, :]
    k = torch.where(top_k >= 1, top_k.clamp(max=k_max), torch.full_like(top_k, k_max))
    scaled = (top_logits / temperature.clamp(min=GREEDY_BELOW)[:, None]).masked_fill(
        rank >= k[:, None], -torch.inf
    )
    probs = scaled.softmax(-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (the best token always stays)
    probs = probs * ((probs.cumsum(-1) - probs) < top_p[:, None])
    cdf = probs.cumsum(-1)
    choice = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=k_max - 1)
    sampled = top_ids.gather(-1, choice[:, None])[:, 0]
    return torch.where(temperature < GREEDY_BELOW, top_ids[:, 0], sampled)
