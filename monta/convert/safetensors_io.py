"""HF safetensors directories: lazy, checked reading and one-shard-at-a-time writing.

Reading opens every file once (``safe_open`` memory-maps it) and returns only the region asked
for, so a rank that needs one expert's rows never touches the others. Writing keeps at most one
output shard in memory.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from monta.convert.errors import ConversionError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Buffers some exporters add; they are recomputed, never converted.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    for dtype, spelled in _DTYPE_NAMES.items():
        if spelled == name:
            return dtype
    raise ConversionError(f"unsupported dtype {name!r}; choose one of "
                          f"{', '.join(_DTYPE_NAMES.values())}")


class HFSafetensors:
    """The safetensors of an HF model directory (one file, or shards with an index).

    Raises:
        ConversionError: no safetensors, only ``pytorch_model*.bin``, an unreadable index, or
            shards that the index names but the directory lacks.
    """

    def __init__(self, hf_dir: str) -> None:
        self.dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConversionError(f"cannot read {index_path}: {error}") from error
        else:
            files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
            if not files:
                bins = [n for n in os.listdir(hf_dir) if n.endswith(".bin")]
                hint = (f" (found {', '.join(bins[:3])}: load it with transformers and "
                        f"save_pretrained(..., safe_serialization=True) first)" if bins else "")
                raise ConversionError(f"{hf_dir} holds no *.safetensors{hint}")
            if len(files) > 1:
                raise ConversionError(f"{hf_dir} has {len(files)} *.safetensors files but no "
                                      f"{INDEX_FILE}; the index says which tensor is where")
            with safe_open(os.path.join(hf_dir, files[0]), "pt") as f:
                self.weight_map = {name: files[0] for name in f.keys()}
        missing = sorted({file for file in self.weight_map.values()
                          if not os.path.isfile(os.path.join(hf_dir, file))})
        if missing:
            raise ConversionError(
                f"{hf_dir}: missing shard(s) {', '.join(missing)} named by {INDEX_FILE} "
                f"({len(set(self.weight_map.values()))} shards in all); download them again")
        self._handles: dict[str, object] = {}

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.dir, file), "pt")
        return self._handles[file]

    def header(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name → (safetensors dtype, shape), from the file headers only."""
        out = {}
        for name, file in self.weight_map.items():
            view = self._open(file).get_slice(name)
            out[name] = (view.get_dtype(), tuple(view.get_shape()))
        return out

    def verify(self, expected: dict[str, tuple[int, ...]]) -> torch.dtype:
        """Check names, shapes and dtypes against ``expected``; returns the (single) dtype.

        Raises:
            ConversionError: a missing or unexpected tensor, a shape that differs from what the
                config implies, a non-float dtype, or mixed dtypes.
        """
        header = self.header()
        found = {n for n in header if not n.endswith(_IGNORED_SUFFIXES)}
        missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
        if missing:
            raise ConversionError(f"{self.dir}: {len(missing)} tensor(s) the config implies are "
                                  f"missing, e.g. {', '.join(missing[:4])}")
        if extra:
            raise ConversionError(f"{self.dir}: {len(extra)} tensor(s) a Mixtral does not have, "
                                  f"e.g. {', '.join(extra[:4])} (biases? another architecture?)")
        wrong = [f"{n}: {header[n][1]} (config.json implies {shape})"
                 for n, shape in expected.items() if header[n][1] != tuple(shape)]
        if wrong:
            raise ConversionError(f"{self.dir}: shape mismatch between config.json and the "
                                  f"weights: " + "; ".join(wrong[:4]))
        dtypes = {header[n][0] for n in expected}
        unsupported = dtypes - set(_FLOAT_DTYPES)
        if unsupported or len(dtypes) != 1:
            raise ConversionError(f"{self.dir}: tensors must all share one of "
                                  f"{', '.join(_FLOAT_DTYPES)}; found {', '.join(sorted(dtypes))}")
        return _FLOAT_DTYPES[dtypes.pop()]

    def get(self, name: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Read ``region`` (one slice per leading axis) of tensor ``name``; nothing else."""
        return self._open(self.weight_map[name]).get_slice(name)[region]


class ShardedSafetensorsWriter:
    """Write tensors in a fixed order into HF-named shards, holding one shard at a time.

    Args:
        out_dir: target directory (created).
        plan: every (name, shape) to be written, in order.
        dtype: the on-disk dtype; tensors are cast to it.
        max_shard_bytes: a shard is closed before it would exceed this (a larger single tensor
            gets a shard of its own), as ``save_pretrained(max_shard_size=...)`` does.
    """

    def __init__(self, out_dir: str, plan: Iterable[tuple[str, tuple[int, ...]]],
                 dtype: torch.dtype, max_shard_bytes: int) -> None:
        self.out_dir, self.dtype = out_dir, dtype
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.shard_of: dict[str, int] = {}
        element = torch.empty((), dtype=dtype).element_size()
        shard, used = 0, 0
        for name, shape in plan:
            size = element * int(torch.Size(shape).numel())
            if used and used + size > max_shard_bytes:
                shard, used = shard + 1, 0
            self.shapes[name], self.shard_of[name] = tuple(shape), shard
            used += size
        self.num_shards = shard + 1
        self.total_size = sum(element * int(torch.Size(s).numel()) for s in self.shapes.values())
        self._pending: dict[str, torch.Tensor] = {}
        self._left = {i: sum(1 for s in self.shard_of.values() if s == i)
                      for i in range(self.num_shards)}
        os.makedirs(out_dir, exist_ok=True)

    def file_name(self, shard: int) -> str:
        if self.num_shards == 1:
            return SINGLE_FILE
        return f"model-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.shapes:
            raise ConversionError(f"internal: {name} is not in the export plan")
        if tuple(tensor.shape) != self.shapes[name]:
            raise ConversionError(f"shape mismatch for {name}: got {tuple(tensor.shape)}, "
                                  f"expected {self.shapes[name]}")
        shard = self.shard_of[name]
        self._pending[name] = tensor.detach().to(self.dtype).contiguous()
        self._left[shard] -= 1
        if self._left[shard] == 0:
            names = [n for n, s in self.shard_of.items() if s == shard]
            save_file({n: self._pending.pop(n) for n in names},
                      os.path.join(self.out_dir, self.file_name(shard)), metadata={"format": "pt"})

    def close(self) -> list[str]:
        """Write the index (when sharded); returns the files written."""
        unwritten = [i for i, left in self._left.items() if left]
        if unwritten:
            raise ConversionError(f"internal: shards {unwritten} were never completed")
        files = [self.file_name(i) for i in range(self.num_shards)]
        if self.num_shards > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: self.file_name(s) for n, s in self.shard_of.items()}}
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
            files.append(INDEX_FILE)
        return files


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"200KB"`` or bytes → bytes (decimal units, as HF uses)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    spelled = text.strip().upper()
    for unit, factor in units.items():
        if spelled.endswith(unit):
            number = spelled[: -len(unit)].strip()
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    if spelled.isdigit():
        return int(spelled)
    raise ConversionError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 1000000")
