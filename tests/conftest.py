"""Shared fixtures: tiny random Qwen2 checkpoints, built once per test session (there is no model hub)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Set before anything imports transformers / huggingface_hub / tokenizers, which read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no fork-after-parallelism warnings from vLLM workers
# The plugin must be active before vLLM first resolves its platform, whichever test imports vLLM first.
os.environ.setdefault("VLLM_NEURON_QWEN2_BACKEND", "cpu")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(**make_tiny_qwen2_kwargs)` -> checkpoint dir, built once per distinct kwargs."""
    from vllm_neuron_qwen2.tiny import make_tiny_qwen2

    built: dict[tuple[tuple[str, Any], ...], Path] = {}

    def make(**kwargs: Any) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            built[key] = make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_qwen2(make_checkpoint: Callable[..., Path]) -> Path:
    """The default tiny checkpoint: 2 layers, hidden 64, 4 heads / 2 KV heads, tied embeddings, float32."""
    return make_checkpoint()
