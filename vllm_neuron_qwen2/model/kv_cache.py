"""KVCacheManager: fixed-shape K and V buffers per layer, one row per sequence slot, owned by the model.

Row `slots` (the last one) is a spare: padded batch rows write there, so they never touch a live slot.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCacheManager(nn.Module):
    def __init__(
        self, num_layers: int, slots: int, kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype
    ):
        super().__init__()
        self.spare_slot = slots
        shape = (slots + 1, kv_heads, seq_len, head_dim)  # [slot, kv_head, position, head_dim]
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype), persistent=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def write_tokens(
        self, i: int, seq_ids: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v: [N, kv_heads, head_dim] for N tokens at (seq_ids[n], positions[n])."""
        heads = torch.arange(k.shape[1], device=k.device)
        index = (seq_ids[:, None], heads[None, :], positions[:, None])
        for cache, new in zip(self.layer(i), (k, v), strict=True):
            cache.index_put_(index, new)

    def read(self, i: int, seq_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of slots `seq_ids`: two [B, kv_heads, length, head_dim] tensors."""
        k, v = self.layer(i)
        return k[:, :, :length].index_select(0, seq_ids), v[:, :, :length].index_select(0, seq_ids)
