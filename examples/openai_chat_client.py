"""Chat with a vllm-neuron-qwen2 server through the `openai` client (see serve.sh).

python examples/openai_chat_client.py [--base-url http://127.0.0.1:8000/v1] [--no-stream]
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--message", default="Hello! Please tell me a short story about a dragon.")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="EMPTY")  # vLLM does not check the key unless --api-key
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": args.message},
    ]
    if args.no_stream:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0.7)
        print(reply.choices[0].message.content)
        return
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=64, temperature=0.7, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
