"""Tiny random Qwen2 checkpoints made locally, for tests, the demo and benchmarks (there is no model hub).

A checkpoint is a real HF Qwen2 directory: `config.json` (with `architectures` and a top-level `rope_theta`
like published Qwen2 checkpoints), `generation_config.json`, safetensors weights (optionally sharded with
`model.safetensors.index.json`) and a byte-level BPE `tokenizer.json` trained on a small built-in corpus,
with Qwen2's special tokens, Qwen2.5's tool-call tokens and Qwen2.5-Instruct's chat template (ChatML, plus
tools).

Weights are random but deliberately large (not HF's std 0.02 init), so logits are peaked and greedy decoding
yields varied tokens: comparisons between implementations then catch real differences.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Ordinary added tokens in Qwen2.5 (not special: they survive detokenization), after the special ones.
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
TOKENIZER_BPE_SIZE = 450  # byte alphabet (256) + merges; the added tokens come on top, like Qwen2's

QWEN2_SPLIT_PATTERN = (  # Qwen2's pre-tokenizer regex
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-Instruct's chat template: ChatML, and with `tools` the <tools> system block, <tool_call> assistant
# turns and <tool_response> user turns that vLLM's hermes tool parser reads. The default system prompt is
# Qwen2-Instruct's, so a chat without tools renders exactly as under Qwen2's ChatML template.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

# Random-init scales, see _random_state_dict; tuned so greedy decoding of the tiny model varies.
GAIN, OUTPUT_GAIN, EMBED_GAIN = 2.0, 3.0, 2.0
BIAS_STD, NORM_STD, FINAL_NORM_MEAN = 0.1, 0.2, 1.5

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A large language model reads a prompt one token at a time and
predicts the next token from everything it has seen so far. The model was trained on a great deal of text,
so it has learned how words usually follow one another, and it can answer questions, write stories and
translate between languages.

Once upon a time there was a small town by the sea. Every morning the fishermen went out in their boats, and
every evening they came back with their nets full of fish. The children played on the beach, built castles
in the sand and watched the ships sail past on their way to distant cities. In the winter the wind was cold
and the waves were high, but the people of the town were happy, because they had each other.

What is the capital of France? The capital of France is Paris. What is the largest planet in the solar
system? Jupiter is the largest planet. How many days are there in a week? There are seven days in a week:
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday. Water boils at one hundred degrees and
freezes at zero degrees.

A computer runs programs written by people. A program is a list of instructions, and the computer follows
them very quickly, one after another. Some programs draw pictures, some play music, and some help people
talk to each other across the world. Hello! How are you today? I am fine, thank you. Please tell me a short
story about a dragon who wanted to learn to read. The dragon found an old library in the mountains, and every
night it opened a new book by the light of the moon.
"""


@functools.cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; training is deterministic for a fixed corpus."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    # Qwen2's normalizer and pre-tokenizer, so transformers' Qwen2Tokenizer (which imposes them) agrees.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_BPE_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # appended after the BPE vocab, as in Qwen2
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in TOOL_CALL_TOKENS])
    return tokenizer.to_str()


def make_tokenizer(max_length: int = 2048) -> Any:
    """The tiny Qwen2-style tokenizer as a `transformers.PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],  # read by transformers 4 and 5
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 2048,
    rope_theta: float = 1_000_000.0,
    dtype: str = "float32",
    num_shards: int = 1,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random Qwen2 checkpoint and the tiny tokenizer to `out_dir` (replacing one there); return it.

    `vocab_size=None` uses the tokenizer's size; a larger value pads the embedding rows like real Qwen2
    (151936 rows for ~151650 tokens). `config_overrides` go to `Qwen2Config` as they are.
    """
    from transformers import Qwen2Config

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    tokenizer = make_tokenizer(max_position_embeddings)
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")

    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype=dtype,
        **config_overrides,
    )
    out = Path(out_dir)
    for stale in out.glob("model*.safetensors*"):  # weights of an earlier checkpoint here would mix with ours
        stale.unlink()
    _save_random_model(config, out, DTYPES[dtype], num_shards, seed, len(tokenizer))
    tokenizer.save_pretrained(out)
    return out


# config.json geometry of Qwen/Qwen2-7B, for `plan`'s arithmetic (it reads no weights)
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}


def make_qwen2_05b_like(out_dir: str | Path, num_hidden_layers: int = 8, seed: int = 0) -> Path:
    """A random checkpoint with Qwen2.5-0.5B's geometry, fewer layers: for benchmarks (~1 GB at 8 layers)."""
    return make_tiny_qwen2(
        out_dir,
        hidden_size=896,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        dtype="float32",
        seed=seed,
    )


def _save_random_model(
    config: Any, out: Path, dtype: torch.dtype, num_shards: int, seed: int, tokenizer_size: int
) -> None:
    from transformers import GenerationConfig, Qwen2ForCausalLM

    # Build on the meta device (no allocation, no slow HF init), then assign our own random tensors.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    state = _random_state_dict(model, config, seed, dtype, tokenizer_size)
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
    )

    unique = {t.data_ptr(): t for t in state.values()}.values()  # a tied lm_head is stored once
    total_bytes = sum(t.numel() * t.element_size() for t in unique)
    # Greedy shard packing can spill into one file more than total/num_shards; the slack avoids that.
    max_shard_size = math.ceil(total_bytes / num_shards * 1.05) if num_shards > 1 else total_bytes + 1
    model.save_pretrained(out, max_shard_size=max_shard_size)

    # transformers 5 keeps rope_theta only inside rope_parameters (4 at the top level); published Qwen2
    # config.json files have it at the top level, and raw-config readers look for it there.
    config_path = out / "config.json"
    raw = json.loads(config_path.read_text())
    raw.setdefault("rope_theta", raw.get("rope_parameters", {}).get("rope_theta"))
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _random_state_dict(
    model: Any, config: Any, seed: int, dtype: torch.dtype, tokenizer_size: int
) -> dict[str, torch.Tensor]:
    """Random weights scaled by fan-in, so any geometry behaves alike: activations stay O(1), logits peaked.

    Linear weights have std GAIN / sqrt(fan_in) (0.25 at hidden 64), output projections a larger gain so
    the layers outweigh the (tied) input embedding; otherwise a random model just repeats its last token.
    Embedding rows past the tokenizer are zero, so their logit is 0 and greedy decoding never picks them.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * std + mean).to(dtype)

    state: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():  # fixed module order: the same seed gives the same weights
        if name == "lm_head.weight" and config.tie_word_embeddings:
            state[name] = state["model.embed_tokens.weight"]
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = randn(param.shape, EMBED_GAIN / math.sqrt(config.hidden_size))
            state[name][tokenizer_size:] = 0
        elif name == "model.norm.weight":
            state[name] = randn(param.shape, NORM_STD, mean=FINAL_NORM_MEAN)
        elif name.endswith("norm.weight"):
            state[name] = randn(param.shape, NORM_STD, mean=1.0)
        elif name.endswith(".bias"):
            state[name] = randn(param.shape, BIAS_STD)
        else:
            gain = OUTPUT_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else GAIN
            state[name] = randn(param.shape, gain / math.sqrt(param.shape[1]))
    return state
