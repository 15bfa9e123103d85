"""The class vLLM's model registry sees for `Qwen2ForCausalLM` while this platform is active.

It wraps the static-shape Neuron decoder. The model runner drives it through `step` with KV slots;
vLLM's own `forward(input_ids, positions)` calling convention (flattened tokens, paged attention) does not
apply to bucket graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from .config import NeuronConfig
    from .modeling import NeuronQwen2ForCausalLM


def local_model_dir(vllm_config: VllmConfig) -> Path:
    """The checkpoint folder: `--model` itself, or its Hugging Face snapshot (downloaded if needed)."""
    mc = vllm_config.model_config
    if Path(mc.model).is_dir():
        return Path(mc.model)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            mc.model,
            revision=mc.revision,
            cache_dir=vllm_config.load_config.download_dir,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"],
        )
    )


class NeuronQwen2ForVLLM(nn.Module):
    """Qwen2ForCausalLM on the Neuron decoder, configured from vLLM's arguments."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from .modeling import NeuronQwen2ForCausalLM
        from .platform import requested_neuron_config

        self.decoder: NeuronQwen2ForCausalLM = NeuronQwen2ForCausalLM.from_pretrained(
            local_model_dir(vllm_config), requested_neuron_config(vllm_config)
        )
        # What the decoder serves with: the request resolved, or a compiled folder's own config.
        self.neuron_config: NeuronConfig = self.decoder.config

    def _driven_by_runner(self) -> NotImplementedError:
        return NotImplementedError(
            "the Neuron decoder runs static bucket graphs over KV slots; "
            "vllm_neuron_qwen2.runner drives it through decoder.step"
        )

    # vLLM's text-generation interface, which the registry checks. Never called on this platform.
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise self._driven_by_runner()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise self._driven_by_runner()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        raise self._driven_by_runner()
