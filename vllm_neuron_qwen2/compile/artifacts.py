"""Artifact folders: where compiled bucket graphs are kept, the key that names them, and safe builds.

A graph folder holds the backend's compiled graphs, the `neuron_config.json` and model `config.json` they
were built for, and `manifest.json`: the key, what it was computed from, and the size and CRC-32 of every
file. It is built in a temporary sibling and renamed into place, so a compile killed half-way leaves no
folder behind, and a truncated or corrupted file fails the manifest check at load: the folder is then
rebuilt, never used.

A servable folder (`vllm-neuron-qwen2 compile --out DIR`) is a model directory that vLLM serves as it is: the
model's config and tokenizer files, `neuron_config.json`, each rank's pre-sharded weights in
`weights/tp{rank}.safetensors`, a manifest over those, and its graph folder in `graphs/`. It holds code
(inductor's generated modules on cpu, the traced model on neuron), and its CRCs catch corruption, not
tampering: a deployment pins the folder's SHA-256 digest (`folder_digest`, which `vllm-neuron-qwen2 info`
shows) in `neuron_config.pinned_digest`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .. import ARTIFACTS_ENV
from ..config import BUCKET_FIELDS, NEURON_CONFIG_FILE, ConfigError, NeuronConfig, Qwen2Shape
from ..model.checkpoint import load_checkpoint
from ..model.parallel import TPGroup
from ..model.qwen2 import Qwen2Decoder

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
GRAPHS_DIR = "graphs"
WEIGHTS_DIR = "weights"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# the code that defines the graphs
GRAPH_SOURCES = ("model/*.py", "compile/cpu.py", "compile/neuron.py", "compile/stateful.py")


class ArtifactError(RuntimeError):
    """A servable folder that cannot be used; the message says why and how to remake it."""


def cache_root() -> Path:
    return Path("~/.cache/vllm-neuron-qwen2").expanduser()


def versions() -> dict[str, str | None]:
    """Versions of everything that compiles or defines the graphs (None: not installed)."""

    def installed(dist_name: str) -> str | None:
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None

    # The source digest makes an edited checkout miss graphs built from the old code.
    digest = hashlib.sha256()
    for path in sorted(p for pattern in GRAPH_SOURCES for p in PACKAGE_DIR.glob(pattern)):
        digest.update(path.read_bytes())
    return {
        "torch": torch.__version__,
        "torch-neuronx": installed("torch-neuronx"),
        "neuronx-cc": installed("neuronx-cc"),
        "vllm-neuron-qwen2": f"{installed('vllm-neuron-qwen2')}+src.{digest.hexdigest()[:12]}",
    }


def key_inputs(config: NeuronConfig, shape: Qwen2Shape) -> dict[str, Any]:
    """Everything the compiled graphs depend on (`config` resolved); where they are kept does not count."""
    neuron = config.to_dict()
    del neuron["compiled_artifacts"], neuron["pinned_digest"]
    return {"model": dataclasses.asdict(shape), "neuron_config": neuron, "versions": versions()}


def artifact_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def is_servable(model_dir: str | Path) -> bool:
    """A folder made by `vllm-neuron-qwen2 compile --out`: it carries its NeuronConfig and its weights."""
    return (Path(model_dir) / NEURON_CONFIG_FILE).is_file() and (Path(model_dir) / WEIGHTS_DIR).is_dir()


def graph_folder(config: NeuronConfig, model_dir: str | Path, key: str) -> Path:
    """A servable folder's own `graphs/`, else `compiled_artifacts`, else $NEURON_COMPILED_ARTIFACTS, else
    the per-key default `~/.cache/vllm-neuron-qwen2/<key>`."""
    if is_servable(model_dir):
        return Path(model_dir) / GRAPHS_DIR
    explicit = config.compiled_artifacts or os.environ.get(ARTIFACTS_ENV)
    return Path(explicit).expanduser().resolve() if explicit else cache_root() / key


# ---------------------------------------------------------------------------------------------- manifests


def _fingerprint(path: Path) -> dict[str, int]:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def write_manifest(folder: Path, skip: tuple[str, ...] = (), **fields: Any) -> None:
    """Record every file under `folder` (but the top-level entries in `skip`) with its size and CRC-32.

    Lock files are left out: compilers create and remove them to coordinate, they hold no content.
    """
    files = {
        path.relative_to(folder).as_posix(): _fingerprint(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and path.suffix != ".lock"
        and path.relative_to(folder).parts[0] not in (*skip, MANIFEST_FILE)
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({**fields, "files": files}, indent=1, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def check(folder: Path, key: str | None = None) -> str | None:
    """Why `folder` cannot be used (missing, incomplete, truncated, corrupted, another key); None if sound."""
    if not folder.is_dir():
        return "it does not exist"
    manifest = read_manifest(folder)
    if manifest is None or "files" not in manifest:
        return f"its {MANIFEST_FILE} is missing or unreadable (an interrupted or foreign build)"
    if key is not None and manifest.get("key") != key:
        return f"it holds key {manifest.get('key')}, not {key}"
    for name, want in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes instead of {want['size']} (truncated or overwritten)"
        if _fingerprint(path)["crc32"] != want["crc32"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file under `folder` (its manifests included): each one's path and content digest.

    The files are hashed rather than the manifests: a manifest records only the files present at build
    time, and `check` ignores any other, but inductor loads every entry in a cache key's directory, so a
    file planted next to the listed ones must change the digest too. Lock files hold no content.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".lock"):
        content = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                content.update(block)
        digest.update(f"{path.relative_to(folder).as_posix()}\0{content.hexdigest()}\n".encode())
    return digest.hexdigest()


def check_pin(model_dir: Path, pinned_digest: str | None) -> None:
    """Refuse a compiled folder whose digest is not the pinned one (when one is pinned)."""
    if pinned_digest is None:
        return
    if not is_servable(model_dir):
        raise ArtifactError(
            "neuron_config.pinned_digest pins a folder made by `vllm-neuron-qwen2 compile`; "
            f"{model_dir} is not one"
        )
    actual = folder_digest(model_dir)
    if actual != pinned_digest:
        raise ArtifactError(
            f"{model_dir} has digest {actual}, but neuron_config.pinned_digest is {pinned_digest}: its files "
            "changed since the digest was pinned; serve only a folder you compiled or verified"
        )


# ------------------------------------------------------------------------------------------ atomic builds


def staging(folder: Path) -> Path:
    """A fresh temporary sibling of `folder` to build in; leftovers of killed builds are removed first."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for old in folder.parent.glob(f"{folder.name}.*-*"):
        kind, _, pid = old.name[len(folder.name) + 1 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit(tmp: Path, folder: Path) -> None:
    """Move the finished build `tmp` to `folder`, replacing what was there."""
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def prepare(
    config: NeuronConfig, model_dir: Path, build: Callable[[Path], None], tp: TPGroup
) -> tuple[Path, bool]:
    """Make the graph folder of `config` (resolved) sound: its path, and True when it had to be built.

    `build(dir)` compiles every graph into `dir`. With tp > 1 it runs on every rank into one shared folder;
    rank 0 alone checks, writes the manifest and commits. Processes that start together (the engines of
    data-parallel ranks) build a missing folder once: one builds under a lock, the others wait, then load it.
    """
    inputs = key_inputs(config, Qwen2Shape.from_pretrained(model_dir))
    key = artifact_key(inputs)
    folder = graph_folder(config, model_dir, key)
    if _from_rank0(lambda: check(folder, key), tp) is not None:
        with _build_lock(folder) if tp.rank == 0 else contextlib.nullcontext():
            problem = _from_rank0(lambda: check(folder, key), tp)  # again: another process may have built it
            if problem is not None:
                _build(folder, key, inputs, problem, model_dir, config, build, tp)
                return folder, True
    logger.info("Using compiled graphs in %s (key %s)", folder, key)
    return folder, False


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `<folder>.lock`, released when its holder ends in any way (even killed).

    The holder deletes the file when done, so a waiter may wake up holding a lock on a deleted file:
    it then locks the current one instead.
    """
    path = folder.with_name(f"{folder.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = path.open("a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        lock.close()
    try:
        yield
    finally:
        path.unlink()
        lock.close()


def _build(
    folder: Path,
    key: str,
    inputs: dict[str, Any],
    problem: str,
    model_dir: Path,
    config: NeuronConfig,
    build: Callable[[Path], None],
    tp: TPGroup,
) -> None:
    tmp = _from_rank0(lambda: _start_build(folder, key, inputs, problem, model_dir), tp)
    build(tmp)
    _barrier(tp)
    if tp.rank == 0:
        dataclasses.replace(config, compiled_artifacts=None, pinned_digest=None).save(tmp)
        shutil.copyfile(model_dir / "config.json", tmp / "config.json")
        write_manifest(tmp, key=key, inputs=inputs, source=str(model_dir.resolve()))
        commit(tmp, folder)
    _barrier(tp)


def _start_build(folder: Path, key: str, inputs: dict[str, Any], problem: str, model_dir: Path) -> Path:
    previous = read_manifest(folder) or _latest_build_of(model_dir)
    if previous and previous.get("key") != key and "inputs" in previous:
        changes = ", ".join(_diff(previous["inputs"], inputs)) or "nothing recorded"
        logger.warning(
            "Compiling bucket graphs into %s (key %s); changed since key %s: %s",
            folder, key, previous.get("key"), changes,
        )  # fmt: skip
    elif folder.exists():
        logger.warning("Rebuilding the compiled graphs in %s: %s", folder, problem)
    else:
        logger.info("Compiling bucket graphs into %s (key %s)", folder, key)
    return staging(folder)


def _latest_build_of(model_dir: Path) -> dict[str, Any] | None:
    """The most recent default-cache build from the same checkpoint, to say what changed since."""
    source = str(model_dir.resolve())
    paths = sorted(cache_root().glob(f"*/{MANIFEST_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((m for p in paths if (m := read_manifest(p.parent)) and m.get("source") == source), None)


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _diff(a, b, f"{prefix}{name}.")
        elif a != b:
            changes.append(f"{prefix}{name} {a!r} -> {b!r}")
    return changes


def _from_rank0(compute: Callable[[], Any], tp: TPGroup) -> Any:
    """`compute()` on rank 0, its result on every rank."""
    box = [compute() if tp.rank == 0 else None]
    if tp.group is not None:
        dist.broadcast_object_list(box, src=0, group=tp.group)
    return box[0]


def _barrier(tp: TPGroup) -> None:
    if tp.group is not None:
        dist.barrier(group=tp.group)


# ------------------------------------------------------------------------------------- servable folders


def check_compatible(saved: NeuronConfig, requested: NeuronConfig, folder: str | Path = "") -> NeuronConfig:
    """The compiled config to serve `requested` with: `saved`, when it has at least the requested sequences,
    length, step budget and drafts per row, and the same TP, backend, dtype and KV pool; else a ConfigError
    showing both."""
    where = f" in {folder}" if folder else ""
    problems = []

    def differs(field: str, option: str, ok: bool) -> None:
        if not ok:
            problems.append(
                f"{option} {getattr(requested, field)} was requested, "
                f"but the graphs{where} were compiled for {getattr(saved, field)}"
            )

    differs("backend", "backend", requested.backend == saved.backend)
    differs("tp_degree", "tensor parallel size (tp_degree)", requested.tp_degree == saved.tp_degree)
    differs("batch_size", "max_num_seqs (batch_size)", requested.batch_size <= saved.batch_size)
    differs("seq_len", "max_model_len (seq_len)", (requested.seq_len or 0) <= saved.seq_len)
    differs(
        "max_num_batched_tokens",
        "max_num_batched_tokens",
        (requested.max_num_batched_tokens or 0) <= saved.max_num_batched_tokens,
    )
    differs("block_size", "block_size", requested.block_size == saved.block_size)
    differs("num_blocks", "KV blocks (num_blocks)", requested.num_blocks in (None, saved.num_blocks))
    differs("dtype", "dtype", requested.dtype in (None, saved.dtype))
    differs(
        "on_device_sampling",
        "on_device_sampling",
        saved.on_device_sampling or not requested.on_device_sampling,
    )
    differs(
        "speculation_length",
        "--speculative-config num_speculative_tokens (speculation_length)",
        requested.speculation_length <= saved.speculation_length,
    )
    for field in BUCKET_FIELDS:
        wanted = getattr(requested, field)
        differs(field, field, wanted is None or sorted(set(wanted)) == getattr(saved, field))
    if problems:
        raise ConfigError(
            "; ".join(problems) + ". Recompile with `vllm-neuron-qwen2 compile` for the requested values, "
            "or request at most the compiled ones."
        )
    return saved


def open_servable(model_dir: str | Path, requested: NeuronConfig) -> NeuronConfig:
    """Check a servable folder's files and that it covers `requested`; returns the config to serve with."""
    model_dir = Path(model_dir)
    check_pin(model_dir, requested.pinned_digest)
    problem = check(model_dir)
    if problem is not None:
        raise ArtifactError(
            f"{model_dir} cannot be served: {problem}. Remake it with `vllm-neuron-qwen2 compile ... --out`."
        )
    return check_compatible(NeuronConfig.load(model_dir), requested, model_dir)


def weights_file(folder: Path, rank: int) -> Path:
    return folder / WEIGHTS_DIR / f"tp{rank}.safetensors"


def save_weights(decoder: Qwen2Decoder, folder: Path) -> Path:
    """Save this rank's shard; tensors shared by several names (tied embeddings) are stored once."""
    state, stored = {}, set()
    for name, tensor in decoder.state_dict().items():
        if tensor.data_ptr() not in stored:
            stored.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    path = weights_file(folder, decoder.tp.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return path


@torch.no_grad()
def load_weights(decoder: Qwen2Decoder, model_dir: str | Path, progress: bool = True) -> None:
    """This rank's pre-sharded weights when `model_dir` is a servable folder, else the HF checkpoint."""
    model_dir = Path(model_dir)
    if not is_servable(model_dir):
        load_checkpoint(decoder, model_dir, progress=progress)
        return
    params = dict(decoder.named_parameters(remove_duplicate=False))
    with safe_open(str(weights_file(model_dir, decoder.tp.rank)), framework="pt") as f:
        for name in f.keys():
            params[name].copy_(f.get_tensor(name))
        filled = {id(params[name]) for name in f.keys()}
    missing = [name for name, param in params.items() if id(param) not in filled]
    if missing:
        raise ArtifactError(f"{model_dir}: the pre-sharded weights lack {missing[:5]}; remake the folder")
