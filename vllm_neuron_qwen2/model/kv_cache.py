"""KVCacheManager: a fixed pool of KV blocks per layer, owned by the model; block tables say whose is which.

Each layer keeps K and V as [num_blocks * block_size, kv_heads, head_dim]: token slot s is position
s % block_size of block s // block_size. Block 0 is never handed to a sequence (vLLM's null block): padding
tokens write there, and block tables are padded with it.
"""

from __future__ import annotations

import torch
from torch import nn

PADDING_BLOCK = 0


class KVCacheManager(nn.Module):
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)  # [token slot, kv_head, head_dim]
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype), persistent=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def write(self, i: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, kv_heads, head_dim] for N tokens, written at token slots slot_mapping [N], in place."""
        for cache, new in zip(self.layer(i), (k, v), strict=True):
            cache.index_put_((slot_mapping,), new)

    def gather(self, i: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks of block_tables [G, B], in order: [G, kv_heads, B * block_size, head_dim] K and V."""
        g, b = block_tables.shape
        offsets = torch.arange(self.block_size, device=block_tables.device)
        slots = (block_tables[:, :, None] * self.block_size + offsets).reshape(-1)  # [G * B * block_size]
        k, v = self.layer(i)
        return tuple(
            c.index_select(0, slots).view(g, b * self.block_size, *c.shape[1:]).transpose(1, 2)
            for c in (k, v)
        )


class KVState(KVCacheManager):
    """The pool as compiled-graph state (neuron backend; XLA): a graph never mutates it. `write` makes new
    tensors, which later reads of the layer see, and `take_updates` hands them over for the graph to return
    after its result; the compiler aliases each of those outputs to its pool tensor, so the program updates
    the pool in place (NxD's input_output_aliases, torch-xla's buffer donation). NxD keeps only parameters
    on the device as state, so the pool's tensors are parameters here."""

    def __init__(self, cache: KVCacheManager):
        k0, _ = cache.layer(0)
        with torch.device("meta"):  # the pool's own tensors take the place of these
            super().__init__(cache.num_layers, cache.num_blocks, cache.block_size, *k0.shape[1:], k0.dtype)
        for name, tensor in cache.named_buffers():
            delattr(self, name)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.written.get(i) or super().layer(i)

    def write(self, i: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Like KVCacheManager.write, into new tensors."""
        self.written[i] = tuple(
            cache.index_put((slot_mapping,), new) for cache, new in zip(self.layer(i), (k, v), strict=True)
        )

    def take_updates(self) -> list[torch.Tensor]:
        """Every layer's K and V after this graph's writes, in the order of `parameters()`."""
        updates = [t for i in range(self.num_layers) for t in self.layer(i)]
        self.written = {}
        return updates
