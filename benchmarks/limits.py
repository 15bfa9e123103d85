"""The machine's physical limits (memory bandwidth, float32 matmul rate) and the decode bound they imply."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FLOAT32 = 4
GIB = 1 << 30


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` timed calls after one warm-up: the least disturbed by other load on the box."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def read_gbps(src: torch.Tensor | None = None, repeats: int = 5) -> float:
    """Read bandwidth: a sum over a 1 GiB float32 buffer reads every byte once and writes nothing, the
    access pattern of streaming weights in decode."""
    import torch

    src = torch.rand(GIB // FLOAT32) if src is None else src
    return src.numel() * FLOAT32 / _best_seconds(lambda: src.sum(), repeats) / 1e9


def measure(repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth over a 1 GiB float32 buffer, and float32 matmul GFLOP/s, with all torch threads."""
    import torch

    src = torch.rand(GIB // FLOAT32)
    dst = torch.empty_like(src)
    copy = _best_seconds(lambda: dst.copy_(src), repeats)

    n = 2048
    a, b = torch.rand(n, n), torch.rand(n, n)
    matmul = _best_seconds(lambda: a @ b, repeats)
    # torch's default float32 GEMM (MKL) does not reach this CPU's peak on AMD; oneDNN with a prepacked
    # weight (what the plugin's linears use) does, so both are reported.
    packed = torch.ops.mkldnn._reorder_linear_weight(b, n)
    onednn = _best_seconds(
        lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), repeats
    )
    return {
        "threads": torch.get_num_threads(),
        "copy_gbps_read_plus_write": 2 * GIB / copy / 1e9,
        "read_gbps": read_gbps(src, repeats),
        "matmul_gflops": 2 * n**3 / matmul / 1e9,
        "matmul_onednn_gflops": 2 * n**3 / onednn / 1e9,
    }


def decode_step_bytes(
    config: dict[str, Any], batch: int, context: float, itemsize: int = FLOAT32
) -> dict[str, float]:
    """Bytes one decode step of `batch` rows must stream from memory, weights and KV `itemsize` bytes each.

    Every decoder weight once, plus the lm_head (= embedding when tied) matrix once, plus each row's K and V
    for its `context` attended positions. Embedding lookups touch only `batch` rows and are left out.
    """
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = (
        h * (q + 2 * kv) + (q + 2 * kv)  # q, k, v projections with bias
        + q * h  # o_proj
        + 3 * h * inter  # gate, up, down
        + 2 * h  # two RMSNorms
    )  # fmt: skip
    weights = (layers * per_layer + vocab * h + h) * itemsize  # + lm_head and the final norm
    kv_bytes = batch * context * layers * 2 * kv * itemsize
    return {"weights": weights, "kv": kv_bytes, "total": weights + kv_bytes}


def decode_bound(read_gbps: float, step_bytes: float, batch: int) -> float:
    """Upper bound on decode tokens/s at `batch` rows: every step streams `step_bytes` at read bandwidth."""
    return batch * read_gbps * 1e9 / step_bytes
