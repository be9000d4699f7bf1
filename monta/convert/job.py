"""The distributed half of ``hf-to-monta`` and ``reshard``: build the target layout, fill, save.

Every rank builds its part of the model on the target TP/PP/EP layout (uninitialised), walks its
own ``sharded_state_dict()`` — which says, for each local tensor, the key and the global region
it holds — reads exactly that region from the source, copies it in, and the job saves a
weights-only checkpoint with :func:`monta.training.checkpointing.save_model_only`. Ranks read
independently (no collectives until the save), so memory per rank is its own shard plus the one
region being read.

``tools/convert_checkpoint.py`` runs the checks in one process first, then starts the job with
:func:`launch` (``torchrun`` on ``P·lcm(T, E·X)`` local CPU processes, gloo) unless it already
runs under ``torchrun``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol

import torch

from monta.convert import mixtral
from monta.convert.dcp_reader import CheckpointReader
from monta.convert.errors import ConversionError
from monta.convert.safetensors_io import HFSafetensors
from monta.progress import progress_bar
from monta.training.arguments import parse_args
from monta.training.validation import ConfigError, validate_model, validate_parallel_dims

logger = logging.getLogger(__name__)

WORKER_ENV = "MONTA_CONVERT_WORKER"
Region = tuple[slice, ...]


@dataclass(frozen=True)
class Layout:
    """Target parallel sizes; ``etp`` defaults to ``tp`` as in ``pretrain_moe.py``."""

    tp: int
    pp: int
    ep: int
    etp: int

    @property
    def min_world_size(self) -> int:
        """Fewest ranks that hold this layout: both TP·PP and ETP·EP·PP must divide it."""
        return self.pp * math.lcm(self.tp, self.ep * self.etp)

    def flags(self) -> list[str]:
        flags = ["--tensor-model-parallel-size", str(self.tp),
                 "--pipeline-model-parallel-size", str(self.pp),
                 "--expert-model-parallel-size", str(self.ep),
                 "--expert-tensor-parallel-size", str(self.etp)]
        return flags + (["--sequence-parallel"] if self.tp > 1 else [])

    def __str__(self) -> str:
        return f"TP{self.tp}·PP{self.pp}·EP{self.ep}·ETP{self.etp}"


def apply_layout(args: argparse.Namespace, layout: Layout) -> argparse.Namespace:
    args.tensor_model_parallel_size = layout.tp
    args.pipeline_model_parallel_size = layout.pp
    args.expert_model_parallel_size = layout.ep
    args.expert_tensor_parallel_size = layout.etp
    # MoE with TP needs sequence parallelism (each TP rank routes its own tokens); megatron
    # refuses it without TP
    args.sequence_parallel = layout.tp > 1
    return args


def args_from_saved(saved: dict, layout: Layout) -> argparse.Namespace:
    """A checkpoint's saved args on a new layout (flags it lacks take today's defaults)."""
    args = parse_args([])
    vars(args).update(saved)
    return apply_layout(args, layout)


def check_layout(args: argparse.Namespace, world_size: int) -> None:
    """``pretrain_moe.py``'s own divisibility checks (heads, groups, layers, experts, ffn),
    then megatron-core's (by building the ``TransformerConfig``)."""
    from monta.training.config import transformer_config_from_args

    try:
        validate_model(args, validate_parallel_dims(args, world_size))
    except ConfigError as error:
        raise ConversionError(f"parallel sizes do not divide the model: {error}") from error
    try:
        transformer_config_from_args(args)
    except (AssertionError, ValueError) as error:
        raise ConversionError(f"invalid model configuration: {error}") from error


def check_save_dir(save: str) -> None:
    from monta.training.checkpointing import TRACKER_FILENAME

    if os.path.isfile(os.path.join(save, TRACKER_FILENAME)):
        raise ConversionError(f"--save {save} already holds a checkpoint; write the converted "
                              f"one to a new directory")


class Source(Protocol):
    def read(self, key: str, index: tuple[int, ...], region: Region,
             global_shape: tuple[int, ...]) -> torch.Tensor:
        """The ``region`` of tensor ``key[index]``; ``global_shape`` is the target's."""


class HFSource:
    """Regions of MoNTA tensors, made from an HF Mixtral's safetensors."""

    def __init__(self, hf_dir: str, dims: mixtral.MixtralDims) -> None:
        self.files, self.dims = HFSafetensors(hf_dir), dims

    def read(self, key, index, region, global_shape):
        return mixtral.read_monta_region(self.dims, key, index, region, self.files.get)


class MontaSource:
    """Regions of another MoNTA checkpoint (any layout).

    Args:
        path: the source ``iter_N`` directory.
        copy_rows: embedding/output rows copied from the source; rows past it are zeros
            (vocabulary padding, which depends on TP, may differ between the two layouts).
    """

    def __init__(self, path: str, copy_rows: int) -> None:
        self.reader, self.copy_rows = CheckpointReader(path), copy_rows

    def read(self, key, index, region, global_shape):
        source_shape = self.reader.global_shape(key)
        same = (source_shape[1:] == tuple(global_shape)[1:] if key in mixtral.VOCAB_KEYS
                else source_shape == tuple(global_shape))
        if not same:
            raise ConversionError(f"shape mismatch for {key}: {source_shape} in "
                                  f"{self.reader.path}, {tuple(global_shape)} in the target model")
        if key not in mixtral.VOCAB_KEYS:
            return self.reader.read([(key, index, region)])[0]
        a, b = region[0].start, region[0].stop
        real = min(b, self.copy_rows)
        parts = [self.reader.read([(key, index, (slice(a, real), *region[1:]))])[0]] \
            if real > a else []
        if b > max(a, real):
            cols = region[1].stop - region[1].start
            parts.append(torch.zeros(b - max(a, real), cols, dtype=self.reader.dtype(key)))
        return torch.cat(parts)


def local_sharded_tensors(model) -> list:
    """This rank's ``ShardedTensor``s (GLU factories expanded into their gate and up parts)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    for value in nested_values(model.sharded_state_dict()):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()  # one tensor, or a list/dict of them (GLU halves)
            built = [built] if isinstance(built, ShardedTensor) else nested_values(built)
            out += [v for v in built if isinstance(v, ShardedTensor)]
        elif isinstance(value, ShardedTensor):
            out.append(value)
    return out


def fill_model(model, source: Source, progress: bool) -> int:
    """Copy every local tensor's region from ``source``; returns the number of regions.

    Parameters start as NaN, so one that no region covered is caught afterwards.
    """
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
        tensors = local_sharded_tensors(model)
        for sh in progress_bar(tensors, enabled=progress,
                               desc="rank 0: tensors", unit="tensor"):
            lead = sh.prepend_axis_num
            index = tuple(sh.global_offset[:lead])
            region = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[lead:], sh.local_shape))
            data = source.read(sh.key, index, region, tuple(sh.global_shape))
            if tuple(data.shape) != tuple(sh.local_shape):
                raise ConversionError(f"shape mismatch for {sh.key}{list(index)}: read "
                                      f"{tuple(data.shape)}, the model holds {sh.local_shape}")
            sh.data.copy_(data)
    unset = [name for name, p in model.named_parameters() if torch.isnan(p).any()]
    if unset:
        raise ConversionError(f"{len(unset)} parameter(s) hold NaN after conversion (not "
                              f"written, or NaN in the source): {', '.join(unset[:4])}")
    return len(tensors)


def build_model(args: argparse.Namespace, padded_vocab: int):
    """This rank's uninitialised part of the model (megatron's local modules, CPU)."""
    from megatron.core import parallel_state

    from monta.model import build_gpt_moe_model
    from monta.training.config import transformer_config_from_args

    config = transformer_config_from_args(args)
    config.perform_initialization = False  # every value is overwritten by fill_model
    # SequentialMLP experts, whatever --moe-grouped-gemm the checkpoint was trained with: their
    # shards are views of the parameters (fill_model copies into them), while GroupedMLP's are
    # transposed copies. Both store the same keys and global shapes, so the result loads into
    # either (tests/test_experts.py checks this).
    config.moe_grouped_gemm = False
    return build_gpt_moe_model(
        config, vocab_size=padded_vocab, max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        use_te=False)


def run_worker(args: argparse.Namespace, padded_vocab: int, source_factory, save: str,
               train_state=None, progress: bool = True) -> str:
    """One rank of the conversion job (under ``torchrun``); returns the saved directory."""
    from monta import parallel
    from monta.compat import apply_cpu_patches
    from monta.training import checkpointing

    world = parallel.world_size_from_env()
    check_layout(args, world)
    dims = validate_parallel_dims(args, world)
    apply_cpu_patches()
    parallel.initialize_distributed(dims, "gloo", args.distributed_timeout_minutes)
    try:
        rank = torch.distributed.get_rank()
        torch.manual_seed(args.seed)
        model = build_model(args, padded_vocab)
        count = fill_model(model, source_factory(), progress=progress and rank == 0)
        logger.info("rank %d: %d tensor regions filled", rank, count)
        return checkpointing.save_model_only(save, [model], args, train_state)
    finally:
        parallel.destroy_distributed()


def is_worker() -> bool:
    """True inside a ``torchrun`` job (ours, or one the user started)."""
    return os.environ.get(WORKER_ENV) == "1" or "TORCHELASTIC_RUN_ID" in os.environ


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: str, argv: list[str], nproc: int, timeout_minutes: float = 120) -> int:
    """Re-run ``script argv`` as ``nproc`` local gloo ranks under ``torchrun``; its exit code.

    The job runs in its own process group, killed as a whole on timeout or Ctrl-C.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), script, *argv]
    env = {**os.environ, WORKER_ENV: "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    job = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return job.wait(timeout=timeout_minutes * 60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        return 124
    except KeyboardInterrupt:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        raise
