"""The tiny random checkpoints are real Qwen2 checkpoints: transformers loads and runs them offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_neuron_qwen2.tiny import make_tiny_qwen2


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def greedy(model_dir: Path, prompt: str, max_new_tokens: int = 24) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return out[0, ids.shape[1] :].tolist()


def test_config_is_qwen2_like(tiny_qwen2: Path) -> None:
    config = json.loads((tiny_qwen2 / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    # top level, as published configs have it (transformers 5 also writes rope_parameters)
    assert config["rope_theta"] == config.get("rope_parameters", config)["rope_theta"] == 1_000_000.0
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 4, 2)
    assert config["tie_word_embeddings"] is True
    generation = json.loads((tiny_qwen2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == config["bos_token_id"]


def test_tokenizer_is_qwen2_like(tiny_qwen2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    assert 400 <= len(tokenizer) <= 500
    assert tokenizer.eos_token == "<|endoftext|>"
    # as in Qwen2.5: the special tokens follow the BPE, then <tool_call> and </tool_call>
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<tool_call>", "</tool_call>"]) == [
        len(tokenizer) - 5,
        len(tokenizer) - 2,
        len(tokenizer) - 1,
    ]
    text = "Hello! What is the capital of France? 🤖"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer(prompt)["input_ids"].count(im_start) == 3  # a special token stays one token


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_chat_template_renders_tools_like_qwen2_5(tiny_qwen2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    prompt = tokenizer.apply_chat_template(
        messages, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER_TOOL)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt)["input_ids"]
    tool_call, end_tool_call = tokenizer.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    assert ids.count(tool_call) == ids.count(end_tool_call) == 3  # one token each, as in Qwen2.5
    # not special: the tags stay in decoded text, where the tool parser looks for them
    assert tokenizer.decode([tool_call, end_tool_call], skip_special_tokens=True) == "<tool_call></tool_call>"


def test_transformers_generates_varied_tokens(tiny_qwen2: Path) -> None:
    tokens = greedy(tiny_qwen2, "Tell me a story about a dragon.")
    assert len(set(tokens)) >= len(tokens) // 2, tokens


def test_same_seed_same_weights(make_checkpoint, tiny_qwen2: Path) -> None:
    other_seed = read_tensors(make_checkpoint(seed=1))
    for name, tensor in read_tensors(make_checkpoint(seed=0)).items():
        assert torch.equal(tensor, read_tensors(tiny_qwen2)[name]), name
        assert not torch.equal(tensor, other_seed[name]), name


def test_sharded_checkpoint(make_checkpoint, tiny_qwen2: Path) -> None:
    sharded = make_checkpoint(num_shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == 2 and all((sharded / name).exists() for name in files)
    assert not (sharded / "model.safetensors").exists()
    expected = read_tensors(tiny_qwen2)
    actual = read_tensors(sharded)
    assert actual.keys() == expected.keys() == index["weight_map"].keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert greedy(sharded, "Hello!") == greedy(tiny_qwen2, "Hello!")


def test_bfloat16_is_stored_as_bfloat16(make_checkpoint) -> None:
    model_dir = make_checkpoint(dtype="bfloat16")
    config = json.loads((model_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # transformers 5 / 4
    assert {t.dtype for t in read_tensors(model_dir).values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").dtype == torch.bfloat16


def test_untied_checkpoint_stores_lm_head(make_checkpoint, tiny_qwen2: Path) -> None:
    assert "lm_head.weight" not in read_tensors(tiny_qwen2)
    untied = read_tensors(make_checkpoint(tie_word_embeddings=False))
    assert not torch.equal(untied["lm_head.weight"], untied["model.embed_tokens.weight"])


def test_vocab_padding(make_checkpoint) -> None:
    model_dir = make_checkpoint(vocab_size=512)
    tokenizer_size = len(AutoTokenizer.from_pretrained(model_dir))
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 512
    embedding = read_tensors(model_dir)["model.embed_tokens.weight"]
    assert embedding.shape == (512, 64)
    assert embedding[tokenizer_size:].abs().sum() == 0  # like unused rows: zero logit, never the argmax
    assert max(greedy(model_dir, "Hello!")) < tokenizer_size


def test_vocab_smaller_than_tokenizer_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_tiny_qwen2(tmp_path, vocab_size=100)
