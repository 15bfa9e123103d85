"""Tensor-parallel layers on torch.distributed functional collectives (traceable by export and compile).

Each layer holds only its rank's shard. How a shard is cut from the checkpoint is recorded on the
parameter as `param.shards`, one `Shard` per checkpoint tensor stacked into it, and applied by
`checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# What torchrun (torch.distributed.run) exports to every rank; env:// initialisation reads exactly these.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); without, oneDNN emulates it."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group; `group is None` means a single rank."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def current(cls, tp_degree: int) -> TPGroup:
        if tp_degree == 1:
            return cls()
        if not dist.is_initialized() and all(name in os.environ for name in TORCHRUN_ENV):
            # Launched by torchrun without a group of its own: start one, as HF's from_pretrained(tp_plan=...)
            # does, so that the standalone API runs under torchrun as it is.
            dist.init_process_group("gloo")
            logger.info(
                "tp_degree=%d: "
                "initialised torch.distributed (gloo) from torchrun's environment, rank %d of %d",
                tp_degree, dist.get_rank(), dist.get_world_size(),
            )  # fmt: skip
        if not dist.is_initialized():
            raise RuntimeError(
                f"tp_degree={tp_degree} needs torch.distributed initialised with {tp_degree} ranks "
                f"(run under `torchrun --nproc-per-node {tp_degree}`)"
            )
        if dist.get_world_size() != tp_degree:
            raise RuntimeError(
                f"tp_degree={tp_degree} but torch.distributed has {dist.get_world_size()} ranks"
            )
        return cls(rank=dist.get_rank(), size=tp_degree, group=dist.group.WORLD)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.group is None else funcol.all_reduce(x, "sum", self.group)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N] on each rank -> [..., size * N], rank-major."""
        if self.group is None:
            return x
        gathered = funcol.all_gather_tensor(x, 0, self.group)  # [size * d0, ...]
        parts = gathered.view(self.size, *x.shape).movedim(0, -2)  # [..., size, N]
        return parts.reshape(*x.shape[:-1], self.size * x.shape[-1])


@dataclass(frozen=True)
class Shard:
    """Rows (dim 0) or columns (dim 1) of a checkpoint tensor of `size` rows/columns that form this
    rank's shard. `index[i]` is the checkpoint row/column placed at local position i; -1 is zero padding.
    """

    dim: int
    size: int
    index: tuple[int, ...]


def contiguous_shard(total: int, tp: TPGroup, dim: int = 0) -> Shard:
    """This rank's equal share of `total` rows, the last ranks padded with -1 when tp does not divide it."""
    per_rank = -(-total // tp.size)
    start = tp.rank * per_rank
    return Shard(dim, total, tuple(i if i < total else -1 for i in range(start, start + per_rank)))


def _empty_param(*shape: int, dtype: torch.dtype, shards: tuple[Shard, ...]) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.shards = shards
    return param


# Input rows from which the default float32 GEMM (MKL) is used rather than oneDNN's blocked weights: on a
# 2-core AVX2 AMD VM it is 9% faster at a 512-token chunk (even from ~256 rows), on an AVX-512 Xeon even at
# 520 rows and 5-15% slower at 264-392; both 1.5-2.5x slower at decode's 8 rows.
PLAIN_GEMM_ROWS = 512


# oneDNN's linears on prepacked weights as operators of their own: torch.compile cannot trace the blocked
# weights, so inductor calls these whole and fuses the element-wise work between them. (Defined through a
# Library, not `custom_op`: torch 2.9's custom_op reads every input's storage, which blocked weights lack.)
_OPS = torch.library.Library("vllm_neuron_qwen2", "DEF")
_OPS.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out) -> Tensor")
_OPS.define("packed_swiglu(Tensor x, Tensor gate, Tensor up, int out) -> Tensor")


def _packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out: int
) -> torch.Tensor:
    """x [.., in] @ W.T (+ bias) -> [.., out], W blocked by `_reorder_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out: int) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) -> [.., out], silu and the product in the GEMMs' float32 epilogues."""
    silu_gate = torch.ops.mkldnn._linear_pointwise(x, gate, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, silu_gate, up, None, "mul")


def _output_like(
    x: torch.Tensor, weight: torch.Tensor, second: torch.Tensor | None, out: int
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out)


for _name, _impl in (("packed_linear", _packed_linear), ("packed_swiglu", _packed_swiglu)):
    _OPS.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"vllm_neuron_qwen2::{_name}", _output_like, lib=_OPS)


class ShardLinear(nn.Module):
    """x @ W.T (+ b) over this rank's shard W [out, in].

    `prepack()` adds oneDNN's blocked layout of W: for the few-row inputs of decode that streams weights
    several times faster than the default BLAS path (the cpu backend calls it).
    """

    packed: torch.Tensor | None = None

    def prepack(self, batch: int, keep_plain: bool) -> None:
        """`batch`: the row count the blocked layout is tuned for (any count still works). `keep_plain`:
        inputs of PLAIN_GEMM_ROWS rows or more (prompt chunks) keep the plain W, at the cost of a second
        copy; else W is dropped (a tied embedding keeps its own reference to it)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch)
        if not keep_plain:
            self.weight = None

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.packed is None or (self.weight is not None and rows >= PLAIN_GEMM_ROWS):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.vllm_neuron_qwen2.packed_linear(x, self.packed, self.bias, self.packed.shape[0])


class ColumnParallelLinear(ShardLinear):
    """Output features split across ranks; each rank computes its slice, no communication.

    `parts` are the row shards of the checkpoint tensors fused into this layer (e.g. q, k, v).
    """

    def __init__(self, in_features: int, parts: tuple[Shard, ...], bias: bool, dtype: torch.dtype):
        super().__init__()
        rows = sum(len(p.index) for p in parts)
        self.weight = _empty_param(rows, in_features, dtype=dtype, shards=parts)
        self.bias = _empty_param(rows, dtype=dtype, shards=parts) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class GateUpLinear(ColumnParallelLinear):
    """The MLP's gate and up projections fused (gate rows, then up rows), with SwiGLU on their products.

    In bfloat16 on the cpu backend, `prepack` blocks the two halves apart, so that oneDNN computes silu and
    the product in the GEMMs' float32 epilogues: silu(x W_gate^T) is rounded once to bf16 and multiplies the
    unrounded x W_up^T, rounded once. A 440-token bf16 prefill on AMX takes 149 ms rather than 178 with the
    float32 chain over both rounded products, which makes five passes over [tokens, intermediate] tensors.
    """

    halves: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepack(self, batch: int, keep_plain: bool) -> None:
        if self.weight.dtype != torch.bfloat16:
            return super().prepack(batch, keep_plain)
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.halves = tuple(reorder(w.contiguous(), batch) for w in self.weight.detach().chunk(2))
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., H] -> silu(x W_gate^T) * (x W_up^T) [.., intermediate / tp], in x's dtype."""
        if self.halves is not None:
            return torch.ops.vllm_neuron_qwen2.packed_swiglu(x, *self.halves, self.halves[0].shape[0])
        gate, up = self.linear(x).chunk(2, dim=-1)
        return (F.silu(gate.float()) * up.float()).to(x.dtype)  # rounded once


class RowParallelLinear(ShardLinear):
    """Input features split across ranks; the partial products are summed with an all-reduce."""

    def __init__(self, cols: Shard, out_features: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.weight = _empty_param(out_features, len(cols.index), dtype=dtype, shards=(cols,))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> the sum over ranks in float32 (the residual stream's dtype): each rank's partial product is
        rounded once to the weight's dtype, as one rank's whole product would be; the sum is not rounded."""
        partial = self.linear(x).float()
        return partial if self.tp.size == 1 else self.tp.all_reduce(partial)


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split across ranks; ids owned by other ranks embed to zero, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        rows = contiguous_shard(vocab_size, tp)
        self.start = rows.index[0]
        self.weight = _empty_param(len(rows.index), hidden_size, dtype=dtype, shards=(rows,))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        return self.tp.all_reduce(embed_owned(ids, self.start, self.weight))


def embed_owned(ids: torch.Tensor, start: int | torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Embeddings of `ids` from this rank's vocabulary rows (ids start..); other ranks' ids embed to zero."""
    rows = weight.shape[0]
    local = ids - start
    owned = (local >= 0) & (local < rows)
    return F.embedding(local.clamp(0, rows - 1), weight) * owned.unsqueeze(-1)


class VocabParallelLMHead(ShardLinear):
    """Vocabulary rows split across ranks; local logits are gathered and the vocab padding cut off."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        rows = contiguous_shard(vocab_size, tp)
        self.weight = _empty_param(len(rows.index), hidden_size, dtype=dtype, shards=(rows,))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(self.linear(x))  # [B, tp * vocab_per_rank]
        return logits[..., : self.vocab_size]
