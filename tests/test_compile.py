"""Compiled bucket graphs and their artifact folders: key, location, atomic builds, validation, CLI, serving.

Most tests use a stand-in `build` that writes a few files, so they run in milliseconds; one test goes through
real torch.compile builds (tiny model, few buckets), kills one, corrupts one and serves from a folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from vllm_neuron_qwen2 import cli
from vllm_neuron_qwen2.compile import artifacts, costs, neuron, stateful
from vllm_neuron_qwen2.compile.backend import build_graphs
from vllm_neuron_qwen2.compile.buckets import Bucket, all_buckets
from vllm_neuron_qwen2.config import ConfigError, NeuronConfig, Qwen2Shape
from vllm_neuron_qwen2.model.checkpoint import load_checkpoint
from vllm_neuron_qwen2.model.graphs import BucketGraph, example_inputs
from vllm_neuron_qwen2.model.parallel import ShardLinear, TPGroup
from vllm_neuron_qwen2.model.qwen2 import Qwen2Decoder
from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM
from vllm_neuron_qwen2.tiny import QWEN2_7B

SMALL = dict(  # a few graphs only: compiling one takes seconds
    batch_size=2,
    seq_len=128,
    max_num_batched_tokens=16,
    prefill_lengths=[16],
    decode_batch_sizes=[2],
    context_lengths=[128],
)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default artifact folders under tmp_path, never in ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setattr(artifacts, "cache_root", lambda: root)
    monkeypatch.delenv(artifacts.ARTIFACTS_ENV, raising=False)
    return root


def resolved(model_dir: Path, **fields) -> NeuronConfig:
    return NeuronConfig(**{**SMALL, **fields}).resolve(Qwen2Shape.from_pretrained(model_dir))


def fake_build(tmp: Path) -> None:
    (tmp / "graph.bin").write_bytes(os.urandom(1000))


def greedy(model: NeuronQwen2ForCausalLM, steps: int = 6) -> list[list[int]]:
    """Greedy continuations of PROMPTS (logits buckets, slots 0 and 1)."""
    first = model.prefill(PROMPTS, [0, 1]).argmax(-1).tolist()
    seqs = [list(p) + [t] for p, t in zip(PROMPTS, first, strict=True)]
    for _ in range(steps):
        tokens = model.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs], [0, 1]).argmax(-1)
        for s, t in zip(seqs, tokens.tolist(), strict=True):
            s.append(t)
    return [s[len(p) :] for s, p in zip(seqs, PROMPTS, strict=True)]


# ------------------------------------------------------------------------------------ key and location


def test_key_covers_what_changes_the_graphs(tiny_qwen2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = Qwen2Shape.from_pretrained(tiny_qwen2)
    base = resolved(tiny_qwen2)

    def key(config: NeuronConfig, model: Qwen2Shape = shape) -> str:
        return artifacts.artifact_key(artifacts.key_inputs(config, model))

    assert key(base) == key(resolved(tiny_qwen2))
    assert key(base) == key(resolved(tiny_qwen2, compiled_artifacts="/elsewhere")), "location is not in it"
    changed = [
        resolved(tiny_qwen2, batch_size=4, prefill_lengths=None, decode_batch_sizes=None),
        resolved(tiny_qwen2, seq_len=256, context_lengths=[256]),
        resolved(tiny_qwen2, context_lengths=[64, 128]),
        resolved(tiny_qwen2, block_size=16),
        resolved(tiny_qwen2, num_blocks=20),
        resolved(tiny_qwen2, dtype="bfloat16"),
        resolved(tiny_qwen2, on_device_sampling=False),
        resolved(tiny_qwen2, compile_mode="compiled"),
    ]
    keys = {key(c) for c in changed} | {key(base, Qwen2Shape(**{**vars(shape), "num_hidden_layers": 3}))}
    assert len(keys) == len(changed) + 1 and key(base) not in keys
    before = key(base)
    monkeypatch.setattr(artifacts.torch, "__version__", "9.9.9")
    assert key(base) != before


def test_graph_folder_location(tiny_qwen2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolved(tiny_qwen2)
    assert artifacts.graph_folder(config, tiny_qwen2, "k1") == artifacts.cache_root() / "k1"
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path / "env"))
    assert artifacts.graph_folder(config, tiny_qwen2, "k1") == tmp_path / "env"
    explicit = resolved(tiny_qwen2, compiled_artifacts=str(tmp_path / "explicit"))
    assert artifacts.graph_folder(explicit, tiny_qwen2, "k1") == tmp_path / "explicit"


# --------------------------------------------------------------------- validation and atomic builds


def test_check_detects_missing_truncated_and_corrupted_files(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 100)
    (folder / "sub" / "b.bin").write_bytes(b"y" * 10)
    artifacts.write_manifest(folder, key="k")
    assert artifacts.check(folder, "k") is None
    assert "key k" in artifacts.check(folder, "other")
    (folder / "new-file").write_text("files added later are ignored")
    assert artifacts.check(folder, "k") is None

    (folder / "a.bin").write_bytes(b"x" * 50)
    assert "truncated" in artifacts.check(folder)
    (folder / "a.bin").write_bytes(b"x" * 99 + b"!")
    assert "corrupted" in artifacts.check(folder)
    (folder / "a.bin").write_bytes(b"x" * 100)
    (folder / "sub" / "b.bin").unlink()
    assert "missing" in artifacts.check(folder)
    (folder / artifacts.MANIFEST_FILE).write_text('{"files": ')
    assert "manifest.json is missing or unreadable" in artifacts.check(folder)
    assert artifacts.check(tmp_path / "nothing") == "it does not exist"


def test_prepare_builds_once_then_reuses(tiny_qwen2: Path) -> None:
    config, builds = resolved(tiny_qwen2), []
    folder, built = artifacts.prepare(
        config, tiny_qwen2, lambda tmp: builds.append(fake_build(tmp)), TPGroup()
    )
    assert built and len(builds) == 1 and artifacts.check(folder) is None
    assert NeuronConfig.load(folder) == config and (folder / "config.json").is_file()
    assert artifacts.prepare(config, tiny_qwen2, lambda tmp: builds.append(tmp), TPGroup()) == (folder, False)
    assert len(builds) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name], "no temporary folder is left"


def test_failed_or_killed_build_leaves_no_folder_and_is_rebuilt(
    tiny_qwen2: Path, private_cache: Path
) -> None:
    config = resolved(tiny_qwen2)

    def crash(tmp: Path) -> None:
        fake_build(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts.prepare(config, tiny_qwen2, crash, TPGroup())
    assert [p.name.split(".")[1].split("-")[0] for p in private_cache.iterdir()] == ["tmp"]
    dead = private_cache / f"{next(private_cache.iterdir()).name.split('.')[0]}.tmp-999999999"
    dead.mkdir()  # what a killed process leaves behind

    folder, built = artifacts.prepare(config, tiny_qwen2, fake_build, TPGroup())
    assert built and artifacts.check(folder) is None
    assert not dead.exists(), "leftovers of dead builds are removed"


def test_corrupted_folder_is_rebuilt(tiny_qwen2: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = resolved(tiny_qwen2)
    folder, _ = artifacts.prepare(config, tiny_qwen2, fake_build, TPGroup())
    with (folder / "graph.bin").open("r+b") as f:
        f.write(b"\0")
    with caplog.at_level(logging.WARNING):
        assert artifacts.prepare(config, tiny_qwen2, fake_build, TPGroup()) == (folder, True)
    assert "graph.bin is corrupted" in caplog.text
    assert artifacts.check(folder) is None


def test_changed_config_compiles_into_a_new_folder_saying_what_changed(
    tiny_qwen2: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = artifacts.prepare(resolved(tiny_qwen2), tiny_qwen2, fake_build, TPGroup())
    with caplog.at_level(logging.INFO, logger=artifacts.__name__):
        second, built = artifacts.prepare(
            resolved(tiny_qwen2, block_size=16), tiny_qwen2, fake_build, TPGroup()
        )
    assert built and second != first and artifacts.check(first) is None, "the old folder stays valid"
    [line] = [r.getMessage() for r in caplog.records]
    assert f"changed since key {first.name}" in line
    assert (
        "neuron_config.block_size 32 -> 16" in line
        and "num_blocks 9 -> 17" in line
        and "batch_size" not in line
    )


# ----------------------------------------------------------------------------------- compatibility


def test_check_compatible_shows_both_values() -> None:
    saved = NeuronConfig(**SMALL, tp_degree=2, dtype="float32")
    requested = NeuronConfig(batch_size=1, seq_len=100, tp_degree=2)
    assert artifacts.check_compatible(saved, requested) is saved
    with pytest.raises(ConfigError) as e:
        artifacts.check_compatible(saved, NeuronConfig(batch_size=8, seq_len=4096, tp_degree=1), "DIR")
    message = str(e.value)
    assert "max_num_seqs (batch_size) 8 was requested, but the graphs in DIR were compiled for 2" in message
    assert "max_model_len (seq_len) 4096" in message and "compiled for 128" in message
    assert "tensor parallel size (tp_degree) 1" in message
    with pytest.raises(ConfigError, match="backend neuron was requested.*compiled for cpu"):
        artifacts.check_compatible(saved, NeuronConfig(batch_size=2, tp_degree=2, backend="neuron"))
    with pytest.raises(ConfigError, match=r"context_lengths \[32\] was requested.*compiled for \[128\]"):
        artifacts.check_compatible(saved, NeuronConfig(tp_degree=2, context_lengths=[32]))
    with pytest.raises(ConfigError, match="block_size 16 was requested.*compiled for 32"):
        artifacts.check_compatible(saved, NeuronConfig(tp_degree=2, block_size=16))


# ---------------------------------------------------------------------------------------- neuron


def test_neuron_backend_without_torch_neuronx_says_how_to_install(tiny_qwen2: Path) -> None:
    if importlib.util.find_spec("torch_neuronx"):
        pytest.skip("torch-neuronx is installed")
    config = resolved(tiny_qwen2, backend="neuron", dtype="float32")
    decoder = Qwen2Decoder(Qwen2Shape.from_pretrained(tiny_qwen2), config, TPGroup())
    names = r"torch-neuronx and neuronx-distributed.*installed: vLLM .*, torch .*, torch-neuronx \(none\)"
    pairs = r"Supported: vLLM 0\.16\.x with torch 2\.9\.x .*pip install"
    with pytest.raises(ImportError, match=f"{names}.*{pairs}"):
        build_graphs(decoder, config, [], tiny_qwen2)


def test_neuron_graph_returns_its_kv_caches_as_aliased_outputs(tiny_qwen2: Path) -> None:
    """The graph traced for Neuron, run on cpu: the plain graph's result, and the updated KV pool returned
    (aliased to the pool's parameters) instead of written into it."""
    config = resolved(tiny_qwen2, backend="neuron", dtype="float32")
    shape = Qwen2Shape.from_pretrained(tiny_qwen2)
    plain = Qwen2Decoder(shape, config, TPGroup())  # unpacked weights, as the neuron backend loads them
    load_checkpoint(plain, tiny_qwen2, progress=False)
    state = stateful.state_decoder(shape, config, TPGroup())
    state.load_state_dict(plain.state_dict(), strict=False)
    bucket = all_buckets(config)[0]
    graph = stateful.StatefulGraph(state, bucket)
    inputs = example_inputs(bucket, config.block_size, shape.vocab_size)
    result, *caches = graph(*inputs, stateful.route(0))
    assert torch.allclose(result, BucketGraph(plain, bucket)(*inputs))
    pool = list(state.kv_cache.parameters())
    assert len(caches) == len(pool) == 2 * shape.num_hidden_layers
    assert graph.aliases() == {p: 1 + i for i, p in enumerate(pool)}
    assert all(p.abs().sum() == 0 for p in pool), "the graph left its state alone"
    assert caches[0].abs().sum() > 0 and torch.equal(caches[0], plain.kv_cache.layer(0)[0])


@pytest.mark.parametrize("tp_degree", [1, 2])
def test_neuron_rank_weights_are_the_graph_parameters_but_the_kv_pool(
    tiny_qwen2: Path, tp_degree: int
) -> None:
    """What `nxd_model.initialize` gets per rank: every parameter of the traced graph but the KV state (device
    state), by name, and nothing else (a tied lm_head once)."""
    config = resolved(tiny_qwen2, backend="neuron", dtype="float32", tp_degree=tp_degree)
    shape = Qwen2Shape.from_pretrained(tiny_qwen2)
    graph = stateful.StatefulGraph(stateful.state_decoder(shape, config, TPGroup(size=tp_degree)), None)
    traced = {name for name, _ in graph.named_parameters()}
    pool = {f"decoder.kv_cache.{name}" for name, _ in graph.decoder.kv_cache.named_parameters()}
    for rank in range(tp_degree):
        weights = stateful.rank_weights(Qwen2Decoder(shape, config, TPGroup(rank=rank, size=tp_degree)))
        assert set(weights) == traced - pool
        assert ("decoder.embed_tokens.start" in weights) == (tp_degree > 1)


def test_neuron_visible_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    neuron.check_cores(32)  # unset: all cores, the runtime's own check applies
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "4-7,10")
    neuron.check_cores(5)
    with pytest.raises(
        ConfigError, match="8 NeuronCores are needed, but NEURON_RT_VISIBLE_CORES=4-7,10 grants 5"
    ):
        neuron.check_cores(8)


# ------------------------------------------------------------------------------- CLI and real builds


def test_cli_rejects_bad_bucket_lists(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(
            ["compile", "m", "--max-num-seqs", "2", "--max-model-len", "64", "--out", "o", "--buckets", "x=1"]
        )
    assert "expected FIELD=N,N,..." in capsys.readouterr().err


def plan(model: Path, *args: str, capsys: pytest.CaptureFixture) -> tuple[list[str], list[str]]:
    """`vllm-neuron-qwen2 plan`'s lines, and its bucket rows."""
    cli.main(["plan", str(model), *args])
    lines = capsys.readouterr().out.splitlines()
    return lines, [line.split()[0] for line in lines if re.match(r"\s+(decode|verify|prefill|score)\[", line)]


def test_plan_lists_every_graph_and_the_default_ladder_stays_in_budget(
    tiny_qwen2: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    lines, graphs = plan(tiny_qwen2, "--max-num-seqs", "8", "--max-model-len", "2048", capsys=capsys)
    assert lines[-1] == f"{len(graphs)} graphs" and len(graphs) <= 24  # the budget at 2048 / 8
    assert {"decode[8x512+sample]", "decode[8x2048+sample]", "prefill[8+512x2048+packed]"} <= set(graphs)
    # the smallest context's largest size without key room too, for one prompt's chunk
    assert {"prefill[8+512x512]", "prefill[8+512x512+packed]"} <= set(graphs)
    assert any(line.startswith("Why this ladder:") for line in lines)
    with caplog.at_level(logging.INFO):
        NeuronQwen2ForCausalLM.from_pretrained(tiny_qwen2, NeuronConfig(batch_size=8, seq_len=2048))
    assert f"{len(graphs)} bucket graphs: 6 decode" in caplog.text, "start-up logs the count"

    (tmp_path / "config.json").write_text(json.dumps(QWEN2_7B))
    args = ["--max-num-seqs", "8", "-tp", "2", "--dtype", "bfloat16", "--backend", "neuron"]
    contexts = {}
    for length in (8192, 16384, 32768):
        lines, graphs = plan(tmp_path, *args, "--max-model-len", str(length), capsys=capsys)
        assert len(graphs) <= 40  # the budget at 32768 / 8, and no more below it
        contexts[length] = sorted({int(g.split("x")[-1].split("+")[0].rstrip("]")) for g in graphs})
    # a long prompt's last chunks and its decode rows attend three quarters of the length, not all of it
    assert contexts == {
        8192: [512, 2048, 4096, 6144, 8192],
        16384: [512, 2048, 8192, 12288, 16384],
        32768: [512, 2048, 8192, 16384, 32768],
    }
    memory = next(line for line in lines if line.startswith("per NeuronCore:"))
    assert re.search(r"weights 7\.\d\d GiB, KV pool 7\.00 GiB \(8\.0 full-length sequences\)", memory)


def test_plan_names_a_model_it_cannot_read_without_a_traceback(tmp_path: Path) -> None:
    for model in (tmp_path / "missing", "Qwen/Not-Cached-Here"):
        with pytest.raises(SystemExit, match="plan: cannot read a Qwen2 config.json for .*give a checkpoint"):
            cli.main(["plan", str(model), "--max-num-seqs", "8", "--max-model-len", "2048"])


def test_plan_costs_are_the_hand_count(tiny_qwen2: Path) -> None:
    """Bytes one call moves, from the shapes: a decode bucket of 4 rows x 512 positions, TP 1, float32; and
    the attention FLOPs of a prefill bucket (which decide whether decode rows run apart from a chunk)."""
    shape = Qwen2Shape.from_pretrained(tiny_qwen2)  # 2 layers, hidden 64, 4 heads / 2 KV heads of 16, tied
    config = NeuronConfig(batch_size=4, seq_len=512, dtype="float32").resolve(shape)
    bucket = Bucket(4, 0, 512, True)
    h, layers, i, v, d = shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size, 455, 16
    qkv = (4 + 2 + 2) * d
    layer = h * qkv + qkv + 4 * d * h + h * 2 * i + i * h + 2 * h  # q|k|v (+ bias), o, gate|up, down, norms
    weights = layers * layer + h + v * h + 4 * h  # + final norm, lm_head (the tied table), 4 embedded tokens
    kv_per_position = layers * 2 * 2 * d  # K and V of 2 KV heads
    got = costs.traffic(bucket, costs.RankShape.of(shape, config), config.block_size)
    assert shape.vocab_size == v
    assert got.weights == 4 * weights
    assert got.kv_read == 4 * (4 * 512 * kv_per_position)  # every row its 512 positions, float32
    assert got.kv_written == got.kv_read + 4 * (4 * kv_per_position)  # the copies, and 4 new positions
    assert got.logits == 4 * 8  # int64 token ids
    rank = costs.RankShape.of(shape, config)
    prefill = Bucket(4, 64, 128, False)  # 4 rows x 128 positions; 64 tokens x (1 + 16 + 8 blocks of 8)
    per_pair = 4 * 4 * d * layers  # q.k and the weighted v, 2 FLOPs each per element, 4 heads, 2 layers
    assert costs.attention_flops(prefill, rank, 8) == (4 * 128 + 64 * 25 * 8) * per_pair


def test_compiled_graphs_call_the_prepacked_linears(tiny_qwen2: Path) -> None:
    """Compiled cpu graphs keep oneDNN's prepacked weights, decode's fast path: the layers hold no plain
    weight, so every linear runs as the opaque packed op between inductor's fused kernels, and the tokens
    are eager mode's."""
    config = NeuronConfig(**SMALL, compile_mode="compiled", on_device_sampling=False)
    compiled = NeuronQwen2ForCausalLM.from_pretrained(tiny_qwen2, config)
    linears = [m for m in compiled.decoder.modules() if isinstance(m, ShardLinear)]
    assert linears and all(m.packed is not None and m.weight is None for m in linears)
    eager_config = dataclasses.replace(config, compile_mode="eager")
    eager = NeuronQwen2ForCausalLM.from_pretrained(tiny_qwen2, eager_config)
    assert greedy(compiled) == greedy(eager)


def test_compile_kill_serve_corrupt(
    tiny_qwen2: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "served"
    args = ["compile", str(tiny_qwen2), "--max-num-seqs", "2", "--max-model-len", "128", "--out", str(out)]
    args += ["--max-num-batched-tokens", "16", "--backend", "cpu", "--buckets"] + [
        f"{k}={v[0]}" for k, v in SMALL.items() if isinstance(v, list)
    ]

    # A compile killed half-way leaves no folder behind (only its temporary one).
    killed = subprocess.Popen(
        [sys.executable, "-c", "from vllm_neuron_qwen2.cli import main; main()", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("served.tmp-*/graphs.tmp-*/inductor")) and time.monotonic() < deadline:
        assert killed.poll() is None, "the compile ended before it could be killed"
        time.sleep(0.2)
    ranks = psutil.Process(killed.pid).children(recursive=True)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not out.exists() and list(tmp_path.glob("served.tmp-*"))
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert ranks and not alive, "the compile's rank processes end with it"

    # The next compile completes the folder (and clears the leftovers).
    cli.main(args)
    printed = capsys.readouterr().out
    # decode (sampling), prefill, score
    assert "Compiled 3 bucket graphs in" in printed and f"into {out}" in printed
    assert artifacts.check(out) is None and artifacts.check(out / artifacts.GRAPHS_DIR) is None
    assert not list(tmp_path.glob("served.*")), "no temporary folder is left"

    # Served from the folder in a fresh process: nothing is compiled, tokens match a fresh compile.
    serve = (
        "import json, logging, sys; logging.basicConfig(level=logging.INFO); "
        "from vllm_neuron_qwen2.config import NeuronConfig; "
        "from vllm_neuron_qwen2.modeling import NeuronQwen2ForCausalLM; "
        "from tests.test_compile import greedy; from torch._dynamo.utils import counters; "
        "m = NeuronQwen2ForCausalLM.from_pretrained(sys.argv[1], NeuronConfig(batch_size=2, seq_len=128)); "
        "print(json.dumps([greedy(m), counters['inductor']]))"
    )
    served = subprocess.run(
        [sys.executable, "-c", serve, str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    tokens, inductor = json.loads(served.stdout.splitlines()[-1])
    assert "Using compiled graphs" in served.stderr and "Compiling" not in served.stderr
    assert inductor.get("fxgraph_cache_hit") == 3 and "fxgraph_cache_miss" not in inductor
    fresh_config = NeuronConfig(
        **SMALL, compile_mode="compiled", on_device_sampling=False, compiled_artifacts=str(tmp_path / "fresh")
    )
    fresh = greedy(NeuronQwen2ForCausalLM.from_pretrained(tiny_qwen2, fresh_config))
    assert tokens == fresh

    # vLLM serves the folder as --model, with the same tokens and, by default, the shapes it was compiled for.
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out))
    config = llm.llm_engine.vllm_config
    assert (config.model_config.max_model_len, config.scheduler_config.max_num_seqs) == (128, 2)
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    assert [list(o.outputs[0].token_ids) for o in outputs] == fresh

    # A truncated graph file is detected at load and the graphs are rebuilt: same tokens.
    victim = max((out / "graphs" / "inductor").rglob("*.so"), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.unlink()  # a new file: this process still maps the old one
    victim.write_bytes(data[:100])
    with caplog.at_level(logging.WARNING):
        rebuilt = NeuronQwen2ForCausalLM.from_pretrained(out, NeuronConfig(batch_size=2, seq_len=128))
    assert "truncated" in caplog.text
    assert greedy(rebuilt) == fresh
    assert artifacts.check(out / artifacts.GRAPHS_DIR) is None
