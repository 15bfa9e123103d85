"""vLLM platform plugin serving Qwen2 through static-shape Neuron decoder graphs.

vLLM imports this package in every process (twice per process for the platform entry point), so it must stay
cheap: torch, vLLM and the model code are only imported when actually used.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import NeuronConfig
    from .modeling import NeuronQwen2ForCausalLM

__all__ = ["NeuronConfig", "NeuronQwen2ForCausalLM", "active_backend", "register", "register_models"]

BACKEND_ENV = "VLLM_NEURON_QWEN2_BACKEND"
ARTIFACTS_ENV = "NEURON_COMPILED_ARTIFACTS"  # the default compiled-graph folder (compile/artifacts.py)
BACKENDS = ("cpu", "neuron")

_LAZY_EXPORTS = {"NeuronConfig": ".config", "NeuronQwen2ForCausalLM": ".modeling"}


def active_backend() -> str | None:
    """The backend this plugin serves with, or None when the plugin should stay inactive."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is invalid; valid values are {', '.join(BACKENDS)}")
        return forced
    return "neuron" if glob.glob("/dev/neuron*") else None


def register() -> str | None:
    """`vllm.platform_plugins` entry point: the platform class path when active, else None.

    An invalid VLLM_NEURON_QWEN2_BACKEND raises; vLLM only logs that here, but `register_models` raises it
    again where vLLM does not swallow it, so start-up fails with the message.
    """
    return "vllm_neuron_qwen2.platform.NeuronQwen2Platform" if active_backend() else None


def register_models() -> None:
    """`vllm.general_plugins` entry point: route `Qwen2ForCausalLM` to our class, only under this platform."""
    if active_backend() is None:
        _reject_cli_device_flag()
        return
    from vllm import ModelRegistry

    from .vllm_model import NeuronQwen2ForVLLM

    ModelRegistry.register_model("Qwen2ForCausalLM", NeuronQwen2ForVLLM)  # overwrites: idempotent


def _reject_cli_device_flag() -> None:
    # vLLM 0.32 has no --device; when we are inactive nobody re-adds it, and argparse would only report an
    # "ambiguous option". General plugins load before the CLI is parsed, so explain the real cause here.
    launcher = os.path.basename(sys.argv[0]) if sys.argv else ""
    if launcher not in ("vllm", "api_server.py"):
        return
    if any(arg == "--device" or arg.startswith("--device=") for arg in sys.argv[1:]):
        raise SystemExit(
            "--device neuron needs a Neuron device (/dev/neuron*) or "
            f"{BACKEND_ENV}=cpu|neuron to activate the vllm-neuron-qwen2 platform"
        )


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        from importlib import import_module

        return getattr(import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
