"""Read any region of a MoNTA checkpoint's tensors on one process, with no collectives.

A ``torch_dist`` checkpoint is a PyTorch Distributed Checkpoint (DCP): ``.metadata`` lists every
key's global shape and the chunks each rank wrote. ``torch.distributed.checkpoint.load`` with
``no_dist=True`` and a planner that asks for a given region reads only the chunks overlapping
it, so a process (or every rank of a job, independently) can stream a checkpoint of any layout
tensor by tensor — one layer's, one expert's rows — without building the model that wrote it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from monta.convert.errors import ConversionError

Region = tuple[slice, ...]


class _CachedReader(dcp.FileSystemReader):
    """Parses ``.metadata`` once instead of at every load."""

    _metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


class _RegionPlanner(dcp.DefaultLoadPlanner):
    """Loads ``requests[alias] = (key, offsets, sizes)`` into ``state_dict[alias]``."""

    def __init__(self, requests: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        items = []
        for alias, (key, offsets, sizes) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            for item in create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunk]):
                items.append(dataclasses.replace(
                    item, dest_index=MetadataIndex(alias, item.dest_index.offset,
                                                   item.dest_index.index)))
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


class CheckpointReader:
    """Region reads from one ``iter_N`` directory.

    Args:
        path: a checkpoint directory (``metadata.json``, ``.metadata``, ``*.distcp``).
    """

    def __init__(self, path: str) -> None:
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ConversionError(f"{path} has no .metadata: not a torch_dist checkpoint")
        self.path = path
        self._reader = _CachedReader(path)
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: md for key, md in self._reader.read_metadata().state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}

    def global_shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise ConversionError(f"checkpoint {self.path} has no tensor {key!r}")
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, requests: list[tuple[str, tuple[int, ...], Region]]) -> list[torch.Tensor]:
        """Read several regions in one pass.

        Args:
            requests: ``(key, index, region)``: ``index`` fixes the leading (layer, expert)
                axes, ``region`` slices the rest (explicit starts and stops).

        Returns:
            One tensor per request, shaped like its region.
        """
        state, plan = {}, {}
        for i, (key, index, region) in enumerate(requests):
            shape = self.global_shape(key)
            offsets = (*index, *(s.start for s in region))
            sizes = (*(1 for _ in index), *(s.stop - s.start for s in region))
            if len(offsets) != len(shape) or any(
                    o < 0 or o + n > dim for o, n, dim in zip(offsets, sizes, shape)):
                raise ConversionError(f"region {offsets}+{sizes} is outside {key!r} {shape} in "
                                      f"{self.path}")
            alias = f"request{i}"
            state[alias] = torch.empty(sizes, dtype=self.dtype(key))
            plan[alias] = (key, offsets, sizes)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=self._reader, planner=_RegionPlanner(plan),
                     no_dist=True)
        return [state[f"request{i}"].reshape([s.stop - s.start for s in region])
                for i, (_, _, region) in enumerate(requests)]

    def read_full(self, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        rest = self.global_shape(key)[len(index):]
        return self.read([(key, index, tuple(slice(0, n) for n in rest))])[0]
