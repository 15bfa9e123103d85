"""Load a HF Qwen2 safetensors checkpoint (single file or sharded index) into one rank's decoder.

Each rank memory-maps the files and reads only the rows or columns of its shard, so its peak
memory is about its shard, not the whole model. Names stay the checkpoint's, see STACKED.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .parallel import Shard
from .qwen2 import Qwen2Decoder

# fused decoder parameter -> the checkpoint tensors stacked into it, in order
STACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old exports carry; recomputed here


class CheckpointError(ValueError):
    """A missing, unexpected or mis-shaped checkpoint tensor; the message names it."""


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


def _read_shard(tensor_slice, shard: Shard, full_shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    parts = []
    for first, length in _runs(shard.index):
        if first < 0:
            shape = list(full_shape)
            shape[shard.dim] = length
            parts.append(torch.zeros(shape, dtype=dtype))
        elif shard.dim == 0:
            parts.append(tensor_slice[first : first + length].to(dtype))
        else:
            parts.append(tensor_slice[:, first : first + length].to(dtype))
    return torch.cat(parts, dim=shard.dim)


def _checkpoint_names(param_name: str) -> list[str]:
    """Decoder parameter name -> checkpoint tensor names ("model." prefix, fused tensors unstacked)."""
    name = param_name if param_name.startswith("lm_head.") else f"model.{param_name}"
    for fused, parts in STACKED.items():
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return [name]


@torch.no_grad()
def load_checkpoint(decoder: Qwen2Decoder, model_dir: str | Path, progress: bool = True) -> None:
    """Fill every parameter of `decoder` from the checkpoint, reading only this rank's slices."""
    model_dir = Path(model_dir)
    with ExitStack() as stack:
        handles = {}
        for path in checkpoint_files(model_dir):
            f = stack.enter_context(safe_open(str(path), framework="pt"))
            handles.update(dict.fromkeys(f.keys(), f))
        expected = set()
        params = list(decoder.named_parameters())
        for param_name, param in tqdm(params, desc="loading weights", disable=not progress, leave=False):
            names = _checkpoint_names(param_name)
            # unsplit parameters (norms) are read whole
            shards = getattr(param, "shards", None) or (
                Shard(0, param.shape[0], tuple(range(param.shape[0]))),
            )
            parts = []
            for name, shard in zip(names, shards, strict=True):
                if name not in handles:
                    raise CheckpointError(f"checkpoint {model_dir} is missing tensor {name!r}")
                expected.add(name)
                parts.append(_read_tensor(name, handles[name].get_slice(name), shard, param))
            param.copy_(torch.cat(parts, dim=0))
        unexpected = sorted(n for n in handles if n not in expected and not n.endswith(IGNORED_SUFFIXES))
        if decoder.shape.tie_word_embeddings and "lm_head.weight" in unexpected:
            unexpected.remove("lm_head.weight")  # some tied exports still carry it; embed_tokens serves
        if unexpected:
            raise CheckpointError(f"checkpoint {model_dir} has unexpected tensor(s) {unexpected[:5]}")


def _read_tensor(name: str, tensor_slice, shard: Shard, param: torch.nn.Parameter) -> torch.Tensor:
    full_shape = list(tensor_slice.get_shape())
    expected = list(param.shape)
    expected[shard.dim] = shard.size
    if full_shape != expected:
        raise CheckpointError(f"tensor {name!r} has shape {full_shape}, but this model expects {expected}")
    return _read_shard(tensor_slice, shard, full_shape, param.dtype)
