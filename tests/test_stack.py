"""The two supported stacks: the version checks at import, and what vllm_compat finds in the installed vLLM
(this file runs on both: vLLM 0.32 with torch 2.13, and the Neuron-host twin's vLLM 0.16 with torch 2.9)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest

from vllm_neuron_qwen2 import vllm_compat
from vllm_neuron_qwen2.vllm_compat import StackError, check_stack

PAIRS = r"vLLM 0\.16\.x with torch 2\.9\.x .*vLLM 0\.32\.x with torch 2\.13\.x"


@pytest.mark.parametrize(
    ("vllm", "torch", "neuronx"),
    [
        ("0.16.0", "2.9.1+cu128", None),
        ("0.16.0", "2.9.1", "2.9.0.2.15.32035"),
        ("0.32.0", "2.13.0+cpu", None),
    ],
)
def test_supported_stacks_pass(vllm: str, torch: str, neuronx: str | None) -> None:
    check_stack(vllm, torch, neuronx)


@pytest.mark.parametrize(
    ("vllm", "torch", "neuronx", "names"),
    [
        ("0.20.1", "2.10.0", None, r"does not support vLLM 0\.20\.1"),
        ("0.16.0", "2.13.0", None, r"vLLM 0\.16\.0 needs torch 2\.9\.x, but torch 2\.13\.0 is installed"),
        ("0.32.0", "2.9.1", None, r"vLLM 0\.32\.0 needs torch 2\.13\.x, but torch 2\.9\.1 is installed"),
        (
            "0.32.0",
            "2.13.0",
            "2.9.0.2.15.32035",
            r"torch-neuronx 2\.9\.0\.2\.15\.32035 is built for torch 2\.9\.x, but torch 2\.13\.0 is",
        ),
    ],
)
def test_a_mismatch_names_both_versions_and_the_supported_pairs(
    vllm: str, torch: str, neuronx: str | None, names: str
) -> None:
    with pytest.raises(StackError, match=names) as raised:
        check_stack(vllm, torch, neuronx)
    assert raised.match(PAIRS)


def test_an_unsupported_vllm_fails_when_the_platform_loads() -> None:
    script = (
        "import vllm; vllm.__version__ = '0.20.1'\n"
        "from vllm.platforms import current_platform; current_platform.device_type"
    )
    env = {"VLLM_NEURON_QWEN2_BACKEND": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode != 0
    assert "StackError: vllm-neuron-qwen2 does not support vLLM 0.20.1" in run.stderr.splitlines()[-1]


def test_feature_detection_finds_what_the_installed_vllm_has() -> None:
    """The compat table (vllm_compat's docstring) against the installed vLLM."""
    import vllm
    from vllm.config import CacheConfig

    current = vllm.__version__.startswith("0.32")
    assert vllm.__version__.startswith(("0.16", "0.32"))
    assert (vllm_compat.no_compilation_times() is not None) == current
    assert (vllm_compat.engine_liveness_monitor() is not None) == current
    assert vllm_compat.block_size_given(CacheConfig()) is False
    assert vllm_compat.available_cpu_count() >= 1
    config = SimpleNamespace(max_num_scheduled_tokens=4096, max_num_batched_tokens=512)
    vllm_compat.cap_scheduled_tokens(config)
    assert config.max_num_scheduled_tokens == 512
    if importlib.util.find_spec("ray"):
        executor = vllm_compat.ray_executor_base().__name__
        assert executor == ("RayExecutorV2" if current else "RayDistributedExecutor")
