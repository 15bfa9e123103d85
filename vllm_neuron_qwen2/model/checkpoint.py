"""Load a HF Qwen2 safetensors checkpoint (single file or sharded index) into one rank's decoder.

Each rank reads only the bytes of its shard's rows or columns with positioned reads (no mmap, whose
touched pages would count against the process), so its peak memory is about its shard, not the
whole model. Names stay the checkpoint's, see STACKED.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from tqdm import tqdm

from .parallel import Shard
from .qwen2 import Qwen2Decoder

# fused decoder parameter -> the checkpoint tensors stacked into it, in order
STACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old exports carry; recomputed here
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
READ_CHUNK_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A missing, unexpected or mis-shaped checkpoint tensor; the message names it."""


class SafetensorsFile:
    """Reads row or column ranges of the tensors in one .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        header = json.loads(os.pread(self.fd, header_len, 8))
        header.pop("__metadata__", None)
        self.tensors: dict[str, dict] = header
        self.data_start = 8 + header_len
        self.bytes_read = 0

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name]["shape"])

    def read_into(self, name: str, dim: int, first: int, out: torch.Tensor) -> None:
        """Copy rows (dim 0) or columns (dim 1) first.. of tensor `name` into `out`, straight from disk."""
        info = self.tensors[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {info['dtype']}; expected one of F32, BF16, F16"
            )
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        row = dtype.itemsize * (shape[1] if len(shape) == 2 else 1)
        start = self.data_start + info["data_offsets"][0]
        if dim == 0:
            step = max(1, READ_CHUNK_BYTES // row)  # bounds the staging buffer of a dtype conversion
            for r in range(0, out.shape[0], step):
                self._read(out[r : r + step], start + (first + r) * row, dtype)
        else:  # one contiguous run per row
            for r in range(shape[0]):
                self._read(out[r], start + r * row + first * dtype.itemsize, dtype)

    def _read(self, out: torch.Tensor, offset: int, dtype: torch.dtype) -> None:
        target = out if out.dtype == dtype and out.is_contiguous() else torch.empty(out.shape, dtype=dtype)
        size = target.numel() * dtype.itemsize
        if os.preadv(self.fd, [target.view(-1).view(torch.uint8).numpy()], offset) != size:
            raise CheckpointError(f"{self.path} is truncated")
        self.bytes_read += size
        if target is not out:
            out.copy_(target)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors checkpoint in {model_dir}")
    return files


def _runs(index: tuple[int, ...]):
    """Split an index into runs of consecutive ids (or of -1 padding): (first, length) pairs."""
    start = 0
    for i in range(1, len(index) + 1):
        if i == len(index) or not (
            (index[i] == -1 and index[start] == -1)
            or (index[start] >= 0 and index[i] == index[start] + i - start)
        ):
            yield index[start], i - start
            start = i


def _read_shard(file: SafetensorsFile, name: str, shard: Shard, out: torch.Tensor) -> None:
    position = 0
    for first, length in _runs(shard.index):
        run = out.narrow(shard.dim, position, length)
        if first < 0:  # zero padding rows/columns
            run.zero_()
        else:
            file.read_into(name, shard.dim, first, run)
        position += length


def _checkpoint_names(param_name: str) -> list[str]:
    """Decoder parameter name -> checkpoint tensor names ("model." prefix, fused tensors unstacked)."""
    name = param_name if param_name.startswith("lm_head.") else f"model.{param_name}"
    for fused, parts in STACKED.items():
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return [name]


@torch.no_grad()
def load_checkpoint(decoder: Qwen2Decoder, model_dir: str | Path, progress: bool = True) -> int:
    """Fill every parameter of `decoder` from the checkpoint, reading only this rank's slices.

    Returns the number of checkpoint bytes read.
    """
    model_dir = Path(model_dir)
    files = [SafetensorsFile(p) for p in checkpoint_files(model_dir)]
    try:
        owner = {name: f for f in files for name in f.tensors}
        expected = set()
        params = list(decoder.named_parameters())
        for param_name, param in tqdm(params, desc="loading weights", disable=not progress, leave=False):
            names = _checkpoint_names(param_name)
            # unsplit parameters (norms) are read whole
            shards = getattr(param, "shards", None) or (
                Shard(0, param.shape[0], tuple(range(param.shape[0]))),
            )
            rows = 0  # stacked tensors fill consecutive rows of the fused parameter
            for name, shard in zip(names, shards, strict=True):
                if name not in owner:
                    raise CheckpointError(f"checkpoint {model_dir} is missing tensor {name!r}")
                expected.add(name)
                _check_shape(name, owner[name].shape(name), shard, param)
                part = param if shard.dim == 1 else param.narrow(0, rows, len(shard.index))
                _read_shard(owner[name], name, shard, part)
                rows += len(shard.index)
        unexpected = sorted(n for n in owner if n not in expected and not n.endswith(IGNORED_SUFFIXES))
        if decoder.shape.tie_word_embeddings and "lm_head.weight" in unexpected:
            unexpected.remove("lm_head.weight")  # some tied exports still carry it; embed_tokens serves
        if unexpected:
            raise CheckpointError(f"checkpoint {model_dir} has unexpected tensor(s) {unexpected[:5]}")
        return sum(f.bytes_read for f in files)
    finally:
        for f in files:
            f.close()


def _check_shape(name: str, full_shape: list[int], shard: Shard, param: torch.nn.Parameter) -> None:
    expected = list(param.shape)
    expected[shard.dim] = shard.size
    if full_shape != expected:
        raise CheckpointError(f"tensor {name!r} has shape {full_shape}, but this model expects {expected}")
