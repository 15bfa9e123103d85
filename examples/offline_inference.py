"""Offline generation with vLLM's `LLM` on the vllm-neuron-qwen2 platform.

    python examples/offline_inference.py --model Qwen/Qwen2.5-0.5B-Instruct   # Neuron host
    VLLM_NEURON_QWEN2_BACKEND=cpu python examples/offline_inference.py --tiny  # any host, tiny model

vLLM's arguments set the static shapes: --max-num-seqs is the number of KV slots, --max-model-len the
sequence length. Everything else of the NeuronConfig goes through `additional_config={"neuron_config": ...}`.
"""

from __future__ import annotations

import argparse
import tempfile

from vllm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a small town by the sea.",
    "A computer runs programs written by people. A program is",
    "Water boils at",
    "The largest planet in the solar system is",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Qwen2 checkpoint folder or Hugging Face id")
    source.add_argument("--tiny", action="store_true", help="make and use a tiny random Qwen2 checkpoint")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tiny-qwen2-") as tmp:
        if args.tiny:
            from vllm_neuron_qwen2.tiny import make_tiny_qwen2

            args.model = str(make_tiny_qwen2(tmp))
        llm = LLM(
            model=args.model,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            tensor_parallel_size=args.tensor_parallel_size,
            # Bucket sizes, on-device sampling, ...: see vllm_neuron_qwen2.config.NeuronConfig.
            additional_config={"neuron_config": {"on_device_sampling": True}},
        )

        greedy = SamplingParams(temperature=0.0, max_tokens=32)
        for output in llm.generate(PROMPTS, greedy):
            print(f"{output.prompt!r} -> {output.outputs[0].text!r}")

        # Logprobs and penalties run on the host through vLLM's sampler; the rest samples inside the graph.
        sampled = SamplingParams(
            temperature=0.8, top_p=0.95, seed=0, max_tokens=32, logprobs=2, presence_penalty=0.5
        )
        for output in llm.generate(PROMPTS[:2], sampled):
            print(f"{output.prompt!r} -> {output.outputs[0].text!r}")

        messages = [{"role": "user", "content": "Tell me a short story about a dragon."}]
        (chat,) = llm.chat(messages, greedy)
        print(f"chat -> {chat.outputs[0].text!r}")


if __name__ == "__main__":  # vLLM may spawn worker processes, which re-import this file
    main()
