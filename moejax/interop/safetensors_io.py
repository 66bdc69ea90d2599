"""Reading and writing safetensors checkpoints the way Hugging Face lays them out, with numpy only.

A checkpoint directory holds either `model.safetensors`, or shards `model-0000i-of-0000n.safetensors`
with `model.safetensors.index.json` (`{"metadata": {"total_size": bytes}, "weight_map": {tensor:
file}}`). Tensors are read one at a time (memory-mapped by safetensors), so a load never holds two
copies of the whole checkpoint.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moejax.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# safetensors metadata that transformers checks before loading ("pt", "tf", "flax" or "mlx").
METADATA = {"format": "pt"}


class Reader:
    """Tensors of one checkpoint directory by name: `keys()`, `get(name) -> np.ndarray`."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    self.weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index} is not a safetensors index (no weight_map: {e})") from None
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            with safe_open(os.path.join(directory, SINGLE), framework="np") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise UserError(f"{directory!r} has neither {SINGLE} nor {INDEX}; a Hugging Face checkpoint "
                            "directory saved as safetensors is needed")
        self._open: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise UserError(f"tensor {name!r} is missing from the checkpoint in {self.directory!r}")
        file = self.weight_map[name]
        if file not in self._open:
            path = os.path.join(self.directory, file)
            if not os.path.isfile(path):
                raise UserError(f"{INDEX} in {self.directory!r} names {file!r}, which does not exist")
            self._open[file] = safe_open(path, framework="np").__enter__()
        return self._open[file].get_tensor(name)

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "200MB", "10KiB" (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise UserError(f"shard size {size!r} is not a size like 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _shards(tensors: Iterable[tuple[str, np.ndarray]], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name, array in tensors:
        if shard and size + array.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = array
        size += array.nbytes
    if shard:
        yield shard


def write(directory: str, tensors: dict[str, np.ndarray], max_shard_size: int | str = "5GB") -> list[str]:
    """Write `tensors` as one `model.safetensors`, or as shards plus the index when they exceed
    `max_shard_size`. Returns the files written."""
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):  # an earlier export's files would mix with these
        if old in (SINGLE, INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old):
            os.remove(os.path.join(directory, old))
    shards = list(_shards(tensors.items(), parse_size(max_shard_size)))
    if len(shards) <= 1:
        save_file({k: np.ascontiguousarray(v) for k, v in (shards[0] if shards else {}).items()},
                  os.path.join(directory, SINGLE), metadata=METADATA)
        return [SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in shard.items()}, os.path.join(directory, name),
                  metadata=METADATA)
        files.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": weight_map}
    with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return files + [INDEX]
