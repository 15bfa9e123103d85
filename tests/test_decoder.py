"""The decoder against HF transformers' Qwen2ForCausalLM (the numerical oracle) on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from decoder_harness import CONFIG, load, play_session
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM
from vllm_neuron_qwen2.compile.buckets import Bucket
from vllm_neuron_qwen2.config import ConfigError, Qwen2Shape
from vllm_neuron_qwen2.model.checkpoint import CheckpointError, load_checkpoint
from vllm_neuron_qwen2.model.graphs import BucketGraph, example_inputs
from vllm_neuron_qwen2.model.parallel import TPGroup
from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder

TOL = 2e-3
HERE = Path(__file__).parent

# name -> checkpoint geometry; together: tied and untied, GQA and MQA, heads and vocab not divisible by TP
GEOMETRIES = {
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "odd_heads_odd_vocab": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, vocab_size=501),
}


def hf_last_logits(hf: Qwen2ForCausalLM, seqs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])


def session_errors(model: NeuronQwen2ForCausalLM, model_dir: Path) -> list[float]:
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [
        (logits - hf_last_logits(hf, seqs)).abs().max().item()
        for seqs, logits in play_session(model, model.vocab_size)
    ]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_prefill_and_teacher_forced_decode_match_hf(make_checkpoint, geometry):
    model_dir = make_checkpoint(**GEOMETRIES[geometry])
    errors = session_errors(load(model_dir), model_dir)
    assert len(errors) >= 22  # 2 prefills + 20 decode steps
    assert max(errors) < TOL, errors


@pytest.mark.parametrize("dtype,num_shards", [("bfloat16", 2), ("float16", 1)])
def test_half_precision_and_sharded_checkpoints_match_hf(make_checkpoint, dtype, num_shards):
    model_dir = make_checkpoint(dtype=dtype, num_shards=num_shards)
    assert (model_dir / "model.safetensors.index.json").exists() == (num_shards > 1)
    assert max(session_errors(load(model_dir), model_dir)) < TOL


def run_tp(model_dir: Path, tp: int, tmp_path: Path) -> list[dict]:
    """Play the harness session under torchrun on `tp` ranks; returns each rank's logits and bytes read."""
    out = tmp_path / f"tp{tp}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp)]
    cmd += ["--standalone", str(HERE / "decoder_harness.py"), str(model_dir), str(out)]
    subprocess.run(cmd, check=True, env=env, timeout=600)
    return [torch.load(out.with_suffix(f".rank{r}.pt")) for r in range(tp)]


@pytest.mark.parametrize(
    "geometry,tp",
    [("gqa_tied", 2), ("mqa", 2), ("odd_heads_odd_vocab", 4)],  # MQA at TP 2 replicates the KV head
)
def test_tensor_parallel_equals_single_rank(make_checkpoint, tmp_path, geometry, tp):
    model_dir = make_checkpoint(**GEOMETRIES[geometry])
    model = load(model_dir)
    single = [lg for _, lg in play_session(model, model.vocab_size)]
    checkpoint_bytes = (model_dir / "model.safetensors").stat().st_size
    for rank in run_tp(model_dir, tp, tmp_path):
        for a, b in zip(rank["logits"], single, strict=True):
            assert (a - b).abs().max().item() < TOL
        # each rank reads about its shard only (norms and replicated KV heads are read by every rank)
        assert rank["bytes_read"] < 1.3 * checkpoint_bytes / tp


def test_decode_over_subset_leaves_other_slots_unchanged(tiny_qwen2):
    model = load(tiny_qwen2)
    model.prefill([[5, 6, 7], [8, 9], [10, 11, 12, 13]], [0, 1, 2])
    cache = model.decoder.kv_cache
    before = [t.clone() for i in range(len(model.decoder.layers)) for t in cache.layer(i)]
    model.decode([20, 21], [4, 3], [2, 0])  # slot 1 is not in this step; padded rows must not touch it
    after = [t for i in range(len(model.decoder.layers)) for t in cache.layer(i)]
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[1], a[1])
        assert not torch.equal(b[2], a[2]) and not torch.equal(b[0], a[0])


def test_buckets_smallest_fitting_and_clear_errors(tiny_qwen2):
    model = load(tiny_qwen2)
    model.prefill([[1] * 16, [2] * 17, [3] * 12], [0, 1, 2])
    prefill = Bucket("prefill", 4, 64, False)  # 45 prompt tokens packed into one call of the 64 bucket
    assert dict(model.padding.real) == {prefill: 45} and model.padding.padded[prefill] == 19
    model.decode([1, 2], [16, 31], [0, 1])
    assert Bucket("decode", 2, 32, False) in model.padding.real  # position 31 attends 32 positions
    with pytest.raises(ValueError, match="max_context_length=64"):
        model.prefill([[1] * 65], [0])
    with pytest.raises(ValueError, match="seq_len=64"):
        model.decode([1], [64], [0])
    with pytest.raises(ValueError, match="seq_ids must be distinct slots"):
        model.decode([1], [3], [4])
    with pytest.raises(ValueError, match="vocab_size"):
        model.decode([model.vocab_size], [3], [0])


def test_step_packs_prompts_and_carries_decode_rows(tiny_qwen2):
    # decode rows riding in packed prefill calls give what separate decode and prefill calls give
    separate, mixed = load(tiny_qwen2), load(tiny_qwen2)
    for model in (separate, mixed):
        model.prefill([[5, 6, 7, 8], [9, 10]], [0, 1])
    prompts = [[11] * 40, [12, 13, 14] * 10]  # 40 + 30 tokens: two calls of at most 64 tokens
    want = torch.cat([separate.decode([20, 21], [4, 2], [0, 1]), separate.prefill(prompts, [2, 3])])
    got = mixed.step(
        input_ids=[20, 21], position_ids=[4, 2], seq_ids=[0, 1], prompts=prompts, prompt_seq_ids=[2, 3]
    )
    assert (got - want).abs().max().item() < 1e-4
    assert mixed.padding.real[Bucket("prefill", 4, 64, False)] == 40
    assert mixed.padding.real[Bucket("prefill", 4, 32, False)] == 30
    assert not any(b.kind == "decode" for b in mixed.padding.real), "the decode rows rode along"
    # and the caches agree: one more decode step over all four slots
    step = ([22, 23, 24, 25], [5, 3, 40, 30], [0, 1, 2, 3])
    assert (mixed.decode(*step) - separate.decode(*step)).abs().max().item() < 1e-4


def test_in_graph_sampling_greedy_matches_argmax_and_respects_top_k(tiny_qwen2):
    model = load(tiny_qwen2)
    prompts = [[5, 6, 7], [8, 9]]
    logits = model.prefill(prompts, [0, 1])
    greedy = torch.tensor([[0.0, 0, 1, 0.5], [0.0, 0, 1, 0.5]])
    assert model.prefill(prompts, [0, 1], sampling=greedy).tolist() == logits.argmax(-1).tolist()
    top2 = set(logits[0].topk(2).indices.tolist())
    for u in torch.linspace(0, 0.999, 7).tolist():
        params = torch.tensor([[1.5, 2, 1.0, u], [0.0, 0, 1.0, u]])
        token = model.prefill(prompts, [0, 1], sampling=params)
        assert token[0].item() in top2 and token[1].item() == logits[1].argmax().item()


def test_strict_export_of_a_prefill_and_a_decode_bucket(tiny_qwen2):
    # the backend-neutral graphs, as a Neuron tracer gets them (the cpu backend prepacks weights for oneDNN)
    config = NeuronConfig(**CONFIG).resolve(Qwen2Shape.from_pretrained(tiny_qwen2))
    decoder = Qwen2Decoder(Qwen2Shape.from_pretrained(tiny_qwen2), config, TPGroup())
    load_checkpoint(decoder, tiny_qwen2, progress=False)
    for bucket in (Bucket("prefill", config.batch_size, 16, False), Bucket("decode", 4, 32, True)):
        graph = BucketGraph(decoder, bucket)
        exported = torch.export.export(graph, example_inputs(bucket), strict=True)
        assert exported.graph_module is not None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=0), "batch_size: must be >= 1"),
        (dict(tp_degree=5), "tp_degree: 5 exceeds num_attention_heads=4"),
        (dict(prefill_lengths=[16, 128]), "prefill_lengths: bucket 128 is larger than max_context_length=64"),
        (dict(decode_lengths=[100]), "decode_lengths: bucket 100 is larger than seq_len=64"),
        (
            dict(prefill_lengths=[8, 32]),
            "prefill_lengths: the largest bucket 32 is below max_context_length=64",
        ),
        (dict(max_context_length=65), "max_context_length: 65 must be between 1 and seq_len=64"),
        (dict(seq_len=4096), "seq_len: 4096 exceeds max_position_embeddings"),
        (dict(backend="gpu"), "backend: 'gpu' is not one of"),
        (dict(dtype="int8"), "dtype: 'int8' is not one of"),
    ],
)
def test_config_errors_name_the_field(tiny_qwen2, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(tiny_qwen2, **overrides)


def test_unknown_neuron_config_field_is_rejected():
    with pytest.raises(ConfigError, match="unknown neuron_config field.*'batchsize'"):
        NeuronConfig.from_dict({"batchsize": 4})


def test_neuron_config_round_trips_through_json(tmp_path, tiny_qwen2):
    model = load(tiny_qwen2)
    model.config.save(tmp_path)
    assert NeuronConfig.load(tmp_path) == model.config


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not implemented"),
    ],
)
def test_unsupported_model_configs_fail_at_load(make_checkpoint, tmp_path, change, message):
    model_dir = copy_checkpoint(make_checkpoint(), tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ConfigError, match=message):
        load(model_dir)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda sd: sd.pop("model.layers.1.self_attn.k_proj.bias"),
            "missing tensor 'model.layers.1.self_attn.k_proj.bias'",
        ),
        (lambda sd: sd.update(extra=torch.zeros(2)), r"unexpected tensor\(s\) \['extra'\]"),
        (
            lambda sd: sd.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(7, 64)}),
            r"'model.layers.0.mlp.up_proj.weight' has shape \[7, 64\]",
        ),
    ],
)
def test_checkpoint_errors_name_the_tensor(tiny_qwen2, tmp_path, edit, message):
    model_dir = copy_checkpoint(tiny_qwen2, tmp_path)
    state = load_file(model_dir / "model.safetensors")
    edit(state)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load(model_dir)
