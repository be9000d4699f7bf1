"""The GPU tier's shared pieces: one NCCL world of one rank with megatron's model-parallel state
for the whole session (as a one-GPU training job has), and the relative error the kernels'
tests compare with."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def nccl_world_of_one():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches

    apply_cpu_patches()  # on a GPU host: only the fixes that also bite without TE
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in fp32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()
