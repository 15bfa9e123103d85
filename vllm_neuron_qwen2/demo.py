"""`./dev demo`: a tiny random Qwen2, served through the plugin's cpu backend three ways.

1. the standalone decoder API, checked token for token against HF transformers' greedy `generate`;
2. vLLM's offline `LLM(...)` with the plugin active;
3. vLLM's OpenAI server (`--device neuron`), answering a streamed chat completion.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_NEURON_QWEN2_BACKEND", "cpu")  # must precede vLLM's platform choice
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Once upon a time there was a small town by the sea."
NEW_TOKENS = 16


def standalone(model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from . import NeuronConfig, NeuronQwen2ForCausalLM

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    model = NeuronQwen2ForCausalLM.from_pretrained(model_dir, NeuronConfig(batch_size=2, seq_len=128))
    tokens = [int(model.prefill([ids], seq_ids=[1]).argmax(-1))]
    while len(tokens) < NEW_TOKENS:
        position = len(ids) + len(tokens) - 1
        tokens.append(int(model.decode([tokens[-1]], position_ids=[position], seq_ids=[1]).argmax(-1)))
    hf = Qwen2ForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        reference = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[
            0, len(ids) :
        ]
    verdict = "same as" if tokens == reference.tolist() else "DIFFERENT from"
    print(f"[standalone] greedy tokens {tokens}\n[standalone] {verdict} HF transformers' generate")


def offline(model_dir: Path) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), max_model_len=256, max_num_seqs=4)
    prompts = [PROMPT, "The capital of France is", "Water boils at"]
    for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)):
        print(f"[LLM] {out.prompt!r} -> {out.outputs[0].text!r}")
    del llm


def server(model_dir: Path) -> None:
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--device", "neuron", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256"]
    cmd += ["--max-num-seqs", "4", "--served-model-name", "tiny-qwen2"]
    print(f"[server] {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(1)
        stream = client.chat.completions.create(
            model="tiny-qwen2",
            messages=[{"role": "user", "content": "Tell me a story about a dragon."}],
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        print(f"[server] chat completion (streamed): {text!r}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    from .tiny import make_tiny_qwen2

    with tempfile.TemporaryDirectory(prefix="tiny-qwen2-") as tmp:
        model_dir = make_tiny_qwen2(tmp)
        print(f"made a tiny random Qwen2 checkpoint in {model_dir}")
        standalone(model_dir)
        offline(model_dir)
        server(model_dir)
        print("demo done: the same static-shape graphs served standalone, through LLM(...) and the server")


if __name__ == "__main__":
    main()
