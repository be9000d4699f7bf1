"""Process groups: torch.distributed + megatron-core's model-parallel groups."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism; DP is what is left of the world after TP · PP."""

    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.pp * self.ep * self.etp)

    def __str__(self) -> str:
        return (f"world={self.world_size} TP={self.tp} PP={self.pp} DP={self.dp} "
                f"EP={self.ep} ETP={self.etp} expert-DP={self.expert_dp}")


_TOPOLOGY = None


def set_topology(topology) -> None:
    """Record the job's rank → node map (from :func:`monta.topology.detect_topology`)."""
    global _TOPOLOGY
    _TOPOLOGY = topology


def get_topology():
    """The job's topology. Before :func:`set_topology` (library use, tests): consecutive
    ``MONTA_RANKS_PER_NODE`` ranks per node if that is set, else one node — no collectives."""
    from monta.topology import Topology

    if _TOPOLOGY is not None:
        return _TOPOLOGY
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = int(os.environ.get("MONTA_RANKS_PER_NODE", world))
    return Topology.uniform(world, per_node)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_distributed(dims: ParallelDims, backend: str | None, timeout_minutes: float) -> None:
    """Join the job's process group and build megatron-core's TP/PP/EP/ETP/DP groups.

    Runs under torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment); a plain
    ``python pretrain_moe.py`` is a world of one.
    """
    backend = backend or default_backend()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.etp,
        # megatron types it int but only builds a timedelta from it: a fraction of a minute
        # keeps every subgroup's collectives on the same (short) timeout as the world's
        distributed_timeout_minutes=timeout_minutes,
    )


def set_seed(seed: int) -> None:
    """Same CPU seed on every rank (replicated weights must agree across TP), megatron's
    tracker seeds for TP-/EP-local randomness (dropout inside parallel regions)."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
