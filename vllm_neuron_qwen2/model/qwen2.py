"""The Qwen2 decoder, one tensor-parallel shard per rank, with its KV cache as module buffers.

Semantics follow HF `modeling_qwen2.py`: RoPE (rotate-half), GQA, bias on q/k/v only, RMSNorm,
SwiGLU MLP, optional tied embeddings. Shapes: B batch rows, L tokens, H hidden, D head_dim.

Precision: weights, the KV cache and the inputs of every linear layer are in the model dtype (float32 or
bfloat16). In float32: the residual stream (the embeddings and each layer's row-parallel output, summed over
TP ranks, are added to it unrounded); RMSNorm (statistics and weight), SwiGLU's silu(gate) * up and RoPE
(angles and rotation; queries stay float32 into attention), each rounded once to the model dtype; attention
scores and softmax (see `_attention`); the returned logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NeuronConfig, Qwen2Shape
from .kv_cache import KVCacheManager
from .parallel import (
    ColumnParallelLinear,
    GateUpLinear,
    RowParallelLinear,
    Shard,
    ShardLinear,
    TPGroup,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    contiguous_shard,
    has_bf16_units,
)


@dataclass(frozen=True)
class HeadLayout:
    """Which query and KV heads one rank holds (-1 = zero padding head).

    KV heads are replicated r times so that their count, lcm(num_kv, tp), splits evenly over tp.
    Each replica serves ceil(group / r) query heads of its original group, the group padded with
    zero heads when r does not divide it. One rule covers tp | kv (no change), kv | tp (KV heads
    replicated up to tp) and heads not divisible by tp (Qwen2-0.5B's 14 heads on TP 4).
    """

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]

    @classmethod
    def build(cls, num_heads: int, num_kv_heads: int, tp: TPGroup) -> HeadLayout:
        group = num_heads // num_kv_heads
        replicas = math.lcm(num_kv_heads, tp.size) // num_kv_heads
        q_per_replica = -(-group // replicas)
        kv_per_rank = num_kv_heads * replicas // tp.size
        q_heads, kv_heads = [], []
        for copy in range(tp.rank * kv_per_rank, (tp.rank + 1) * kv_per_rank):
            kv, part = divmod(copy, replicas)
            kv_heads.append(kv)
            for j in range(part * q_per_replica, (part + 1) * q_per_replica):
                q_heads.append(kv * group + j if j < group else -1)
        return cls(tuple(q_heads), tuple(kv_heads))


def head_shard(heads: tuple[int, ...], num_heads: int, head_dim: int, dim: int = 0) -> Shard:
    """The checkpoint rows (or columns) of `heads`, out of a tensor holding `num_heads` heads."""
    index = tuple(h * head_dim + d if h >= 0 else -1 for h in heads for d in range(head_dim))
    return Shard(dim, num_heads * head_dim, index)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In float32, rounded once to the weight's dtype."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(self.weight.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """positions [B, L] -> cos, sin [B, 1, L, D], float32.

    The frequencies are computed in the graph, not kept in a buffer: a graph's only tensors are its weights,
    its KV state and its inputs (what NxD's tracer loads and aliases)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    freqs = positions.float()[..., None] * (1.0 / theta**exponents)  # [B, L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, shape: Qwen2Shape, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        d = shape.head_dim
        self.head_dim = d
        self.num_heads, self.num_kv_heads = len(layout.q_heads), len(layout.kv_heads)
        q = head_shard(layout.q_heads, shape.num_attention_heads, d)
        kv = head_shard(layout.kv_heads, shape.num_key_value_heads, d)
        # fused q|k|v rows; the checkpoint's q_proj, k_proj, v_proj stack into it (checkpoint.STACKED)
        self.qkv_proj = ColumnParallelLinear(shape.hidden_size, (q, kv, kv), bias=True, dtype=dtype)
        self.o_proj = RowParallelLinear(
            head_shard(layout.q_heads, shape.num_attention_heads, d, dim=1), shape.hidden_size, tp, dtype
        )

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, L, H] -> q [B, Hq, L, D], k and v [B, Hkv, L, D], RoPE applied to q and k."""
        b, n, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            ],
            dim=-1,
        )
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # RoPE in float32; q stays float32 into attention, k is rounded once for the KV cache
        return apply_rope(q.float(), cos, sin), apply_rope(k.float(), cos, sin).to(k.dtype), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [B, Hq, L, D] -> [B, L, H], summed over ranks."""
        b, _, n, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, shape: Qwen2Shape, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        rows = contiguous_shard(shape.intermediate_size, tp)
        # fused gate|up rows; the checkpoint's gate_proj and up_proj stack into it
        self.gate_up_proj = GateUpLinear(shape.hidden_size, (rows, rows), bias=False, dtype=dtype)
        self.down_proj = RowParallelLinear(
            contiguous_shard(shape.intermediate_size, tp, dim=1), shape.hidden_size, tp, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))  # SwiGLU in gate_up_proj


class DecoderLayer(nn.Module):
    def __init__(self, shape: Qwen2Shape, layout: HeadLayout, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype)
        self.self_attn = Attention(shape, layout, tp, dtype)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype)
        self.mlp = MLP(shape, tp, dtype)


class Qwen2Decoder(nn.Module):
    """One rank's shard of Qwen2 plus its KV cache. `forward` is the body of every bucket graph: static
    shapes in, static shapes out, no data-dependent Python control flow.
    """

    def __init__(self, shape: Qwen2Shape, config: NeuronConfig, tp: TPGroup):
        super().__init__()
        dtype = getattr(torch, config.dtype)
        layout = HeadLayout.build(shape.num_attention_heads, shape.num_key_value_heads, tp)
        self.shape, self.config, self.tp, self.layout = shape, config, tp, layout
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(shape, layout, tp, dtype) for _ in range(shape.num_hidden_layers)
        )
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype)
        self.lm_head = VocabParallelLMHead(shape.vocab_size, shape.hidden_size, tp, dtype)
        if shape.tie_word_embeddings:
            self.lm_head.weight = (
                self.embed_tokens.weight
            )  # both are split by vocab rows, so one shard serves both
        self.kv_cache = KVCacheManager(
            shape.num_hidden_layers,
            config.num_blocks,
            config.block_size,
            len(layout.kv_heads),
            shape.head_dim,
            dtype,
        )
        self.scale = shape.head_dim**-0.5
        self.bf16_units = has_bf16_units()  # asked once: torch.compile cannot trace the question

    def prepack_linears(self, batch: int, keep_plain: bool) -> None:
        """Give every linear layer oneDNN's blocked layout of its weight (cpu backend, either mode); with
        `keep_plain`, the layers' own linears keep their plain weight too, for prompt chunks (the lm_head
        only ever sees a few rows)."""
        for module in self.layers.modules():
            if isinstance(module, ShardLinear):
                module.prepack(batch, keep_plain)
        self.lm_head.prepack(batch, keep_plain=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        key_blocks: torch.Tensor,
        key_starts: torch.Tensor,
        key_visible: torch.Tensor,
        logit_index: torch.Tensor,
        decode_rows: int,
        row_tokens: int = 1,
    ) -> torch.Tensor:
        """One step over N tokens (input_ids, position_ids, slot_mapping [N]) -> logits [R, V] at logit_index.

        Every token writes its K/V at its slot first, then attends up to its own position, so a chunk sees the
        chunks before it. The first `decode_rows` x `row_tokens` tokens are the decode rows, Q = row_tokens
        consecutive tokens each (a verify graph's row: its last sampled token, then its drafts): row r
        attends the blocks of block_tables[r] [d, C / block_size]. The other T tokens are prompt chunks of one
        or several sequences: they attend the step's key blocks, key_blocks [KB] (the blocks of those
        sequences, each once; block i holds positions key_starts[i] ..), a token only the blocks
        key_visible [T, KB] marks as its sequence's. Each sequence's K/V is thus gathered once per layer:
        d x C + KB x block_size.
        """
        d, q_len, n = decode_rows, row_tokens, input_ids.shape[0]
        dq, bs = d * q_len, self.kv_cache.block_size
        cos, sin = rope_cos_sin(position_ids[None], self.shape.head_dim, self.shape.rope_theta)
        x = self.embed_tokens(input_ids[None]).float()  # [1, N, H], the residual stream: float32
        if d:
            context = torch.arange(block_tables.shape[1] * bs, device=x.device)  # [C]
            row_positions = position_ids[:dq].view(d, 1, q_len, 1, 1)
            row_mask = context <= row_positions  # [d, 1, Q, 1, C], the query group G broadcast
        if n > dq:
            offsets = torch.arange(bs, device=x.device)
            key_positions = (key_starts[:, None] + offsets).reshape(-1)  # [K = KB * bs]
            visible = key_visible[:, :, None].expand(-1, -1, bs).reshape(n - dq, -1)  # [T, K]
            chunk_mask = (visible & (key_positions[None, :] <= position_ids[dq:, None]))[None, None]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)  # [1, heads, N, D]
            self.kv_cache.write(i, slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
            parts = []
            if d:  # a row's queries, a KV head's group of them together: [d, Hkv, Q x G, D], G = Hq / Hkv
                keys, values = self.kv_cache.gather(i, block_tables[:d])  # [d, Hkv, C, D]
                hkv = keys.shape[1]
                row_q = q[0, :, :dq].unflatten(0, (hkv, -1)).unflatten(2, (d, q_len))  # [Hkv, G, d, Q, D]
                row_q = row_q.permute(2, 0, 3, 1, 4)  # [d, Hkv, Q, G, D]
                mask = row_mask.expand(-1, -1, -1, row_q.shape[3], -1).flatten(2, 3)  # [d, 1, Q x G, C]
                row_q = row_q.flatten(2, 3)  # no K/V repeated per head
                out = self._attention(row_q, keys, values, mask)
                out = out.unflatten(2, (q_len, -1)).permute(1, 3, 0, 2, 4)  # [Hkv, G, d, Q, D]
                parts.append(out.flatten(0, 1).flatten(1, 2)[None])  # [1, Hq, d x Q, D]
            if n > dq:  # the chunks' queries [1, Hq, T, D] against the key blocks [1, Hkv, K, D]
                keys, values = self.kv_cache.gather(i, key_blocks[None])
                parts.append(self._chunk_attention(q[:, :, dq:], keys, values, chunk_mask))
            x = x + attn.output(torch.cat(parts, dim=2))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x[0, logit_index])).float()

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """softmax(q k^T) v on float32 copies of q, k and v; the result in the model dtype. Queries stay
        float32: rounded to bfloat16 (as HF rounds them), the bf16 errors left vLLM CPU's bound."""
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=self.scale, enable_gqa=True
        )
        return out.to(v.dtype)

    def _chunk_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """`_attention` for prompt chunks (compute-bound). On a CPU with bf16 units, a bfloat16 model's chunks
        multiply in bf16 instead (AMX: 2.2x faster for a 512-token chunk over 4112 keys): q goes in as
        two bf16 halves, high + low, against keys [k, k], so that q k^T keeps float32 precision (v is doubled
        too, as the kernel wants equal head dims). That kernel rounds the probabilities to bf16 before they
        weight v, as HF does. XLA's SDPA decomposition computes bfloat16 in float32 anyway."""
        if q.device.type != "cpu" or k.dtype != torch.bfloat16 or not self.bf16_units:
            return self._attention(q, k, v, mask)
        high = q.to(k.dtype)
        low = (q - high.float()).to(k.dtype)
        out = F.scaled_dot_product_attention(
            torch.cat((high, low), dim=-1), torch.cat((k, k), dim=-1), torch.cat((v, v), dim=-1),
            attn_mask=mask, scale=self.scale, enable_gqa=True,
        )  # fmt: skip
        return out[..., : v.shape[-1]]
