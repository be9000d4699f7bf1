"""Checkpoints with megatron-core ``dist_checkpointing`` (``torch_dist``), saved atomically.

Layout (Megatron-LM's, so its tools recognise it)::

    SAVE/latest_checkpointed_iteration.txt     the tracker: the last *complete* iteration
    SAVE/iter_0000100/                         one checkpoint (any TP/PP/EP layout can load it)
    SAVE/iter_0000200.tmp/                     a save in progress; never read

Every rank writes its shards into ``iter_N.tmp``; when all have finished, the ranks hash the files
between them and rank 0 writes ``manifest.json`` (sizes, sha256; :mod:`monta.training.manifest`),
renames the directory to ``iter_N`` and then replaces the tracker (``os.replace``, atomic on
POSIX). A crash at any point leaves the previous checkpoint and the tracker untouched; a failed
write (a full disk) is agreed on by every rank and reported, never half-committed. With
``--keep-last K`` older checkpoints are deleted only after that.

``--load`` checks the candidates newest first (:mod:`monta.training.load_plan`): cheap file checks
before any process group, then the manifest's checksums, shared among ranks, with an all-reduced
verdict; a bad checkpoint falls back to the previous good one (or stops, ``--no-load-fallback``).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import random as mrandom
from torch.distributed.checkpoint.api import CheckpointException

from monta.training import fault_injection, manifest
from monta.training.optimizer import (
    allocate_distributed_adam_state,
    checkpoint_metadata,
    optimizer_layout_mismatch,
)
from monta.training.watchdog import PHASE, say

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or saved; the message names the file and the fix."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, torn or unreadable (another may still be good)."""


@dataclass
class TrainState:
    """Loop position, saved in every checkpoint."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    """The last complete iteration under ``root``, or None when nothing was saved yet."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number, found {text[:40]!r}; "
                              f"fix or delete it")
    return int(text)


def find_checkpoint(load: str, required: bool) -> str | None:
    """The checkpoint ``--load`` names (the tracker's, or one ``iter_N`` directory), after the
    cheap local file checks; no fallback, no checksums, no collectives.

    ``load`` is either a save root (with a tracker) or one ``iter_N`` directory. With
    ``required=False`` (``--load`` equal to ``--save``: auto-resume) an empty root means a
    fresh start.
    """
    from monta.training.load_plan import plan_load

    plan = plan_load(load, required, fallback=False)
    return plan.candidates[0] if plan is not None else None


def verify_checkpoint_files(path: str) -> None:
    """File-level checks of one checkpoint (sizes against its manifest, or the files a
    manifest-less torch_dist checkpoint must have); local, no checksums, no collectives."""
    verdict = manifest.verify(path, hash_share=None)
    if not verdict.ok:
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete or corrupt: "
                                     f"{'; '.join(verdict.problems)}; load an earlier iter_* "
                                     f"directory")


def _rng_state() -> dict:
    tracker = mrandom.get_cuda_rng_tracker()
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tracker.get_states(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mrandom.get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrap(chunk):
    """The GPTModel inside megatron's DDP / Float16Module wrappers (each adds ``module.``)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state_dict(model, optimizer, scheduler, train_state, args, with_optimizer: bool,
                        with_rng: bool, is_loading: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    state: dict = {"checkpoint_version": CHECKPOINT_VERSION}
    if len(model) == 1:
        state["model"] = _unwrap(model[0]).sharded_state_dict()
    else:
        for i, chunk in enumerate(model):
            state[f"model{i}"] = _unwrap(chunk).sharded_state_dict()
    if with_optimizer:
        model_state = {k: v for k, v in state.items() if k.startswith("model")}
        merged = model_state["model"] if "model" in model_state else {
            k: v for chunk in model_state.values() for k, v in chunk.items()}
        state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading,
                                                          metadata=checkpoint_metadata(args))
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["train_state"] = asdict(train_state)
    state["world_size"] = world
    state["args"] = vars(args).copy()
    if with_rng:
        # One RNG state per rank: exact resume on the same layout. A different world size
        # cannot reuse them (see load_checkpoint).
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,),
                                           replica_id=0)
    return state


def save_checkpoint(root: str, train_state: TrainState, model, optimizer, scheduler,
                    args: argparse.Namespace) -> str:
    """Save atomically into ``root/iter_N`` (then prune to ``--keep-last``); returns that path.

    Raises:
        CheckpointError: on every rank, when any rank failed to write (e.g. a full disk); the
            previous checkpoint and the tracker are untouched.
    """
    state = _sharded_state_dict(model, optimizer, scheduler, train_state, args,
                                with_optimizer=not args.no_save_optim, with_rng=True,
                                is_loading=False)
    return _save_atomically(root, train_state.iteration, state, getattr(args, "keep_last", None))


def save_model_only(root: str, model, args: argparse.Namespace,
                    train_state: TrainState | None = None) -> str:
    """Save weights only (no optimizer, scheduler or RNG state) atomically into ``root/iter_N``.

    For conversion tools: the checkpoint loads like any other; :func:`load_checkpoint` then
    starts a fresh optimizer. ``train_state`` defaults to iteration 0.
    """
    train_state = train_state or TrainState()
    state = _sharded_state_dict(model, None, None, train_state, args, with_optimizer=False,
                                with_rng=False, is_loading=False)
    state["has_rng_state"] = False
    return _save_atomically(root, train_state.iteration, state, None)


class _ErrorRecords(logging.Handler):
    """Collects megatron's checkpoint-writer error logs: its writer processes report the
    real cause (``[Errno 28] No space left on device``) there, while the exception raised to us
    is torch DCP's bare ``CheckpointException``."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _one_line(text) -> str:
    return " ".join(str(text).split())[:240]


_ELSEWHERE = "the write failed on another rank"


def _describe(error: BaseException) -> str:
    """One line for a save failure; torch DCP's CheckpointException carries each failed rank's
    own exception (its message alone is ``CheckpointException ranks:dict_keys([0, 2])``)."""
    failures = getattr(error, "failures", None)
    if isinstance(error, CheckpointException) and failures:
        return "writes failed on " + "; ".join(
            f"rank {rank}: {_one_line(wrapped[0] if isinstance(wrapped, tuple) else wrapped)}"
            for rank, wrapped in failures.items())
    if isinstance(error, CheckpointException):
        return _ELSEWHERE
    return f"{type(error).__name__}: {_one_line(error)}"


def _disk_full_hint(directory: str) -> str:
    """A write into a full file system fails in many guises (ENOSPC, or torch's zip writer's
    "unexpected pos"); say plainly when that is what happened."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return ""
    if usage.free < min(64 << 20, usage.total // 100):
        return (f"; no space left on the device holding {directory} ({usage.free:,} bytes free "
                f"of {usage.total:,})")
    return ""


def _agree(step: str, action, directory: str) -> list[str]:
    """Run ``action()`` on every rank, then agree (one all-gather) on who failed; returns every
    rank's error text, empty when all succeeded. A failing rank prints its error at once, so
    it is on record even if a peer never arrives here."""
    error = None
    records = _ErrorRecords()
    writer_log = logging.getLogger("megatron.core.dist_checkpointing")
    writer_log.addHandler(records)
    try:
        action()
    # every local failure must reach every rank; torch DCP's CheckpointException derives from
    # BaseException, so it is named or it would escape
    except (Exception, CheckpointException) as exc:  # noqa: BLE001
        error = f"rank {dist.get_rank()}: {_describe(exc)}"
        causes = [c for c in dict.fromkeys(_one_line(m) for m in records.messages)
                  if c.split(": ", 1)[-1] not in error]
        if causes:
            error += f" (writer: {'; '.join(causes)[:300]})"
        say(f"{error}{_disk_full_hint(directory)} (during checkpoint {step})")
    finally:
        writer_log.removeHandler(records)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [e for e in errors if e is not None]


def _in_process_write_results() -> None:
    """Keep megatron's checkpoint writer from starting a helper process that outlives us.

    megatron-core 0.16.1's ``FileSystemWriterAsync`` collects write results through a queue
    from a ``multiprocessing`` *spawn* Manager, created on the first save: a server process per
    rank that starts a fresh interpreter (seconds of the first save, all ranks at once) and
    stays until the rank's interpreter tears down — forever, when the rank is SIGKILLed or
    leaves through ``os._exit`` (the watchdog, pretrain_moe.py). Our saves are synchronous, so
    the results are put and taken in this process: a plain thread-safe queue does the same job.
    Seeding megatron's module-level cache keeps its own code path otherwise unchanged.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _save_atomically(root: str, iteration: int, state: dict, keep_last: int | None) -> str:
    final_dir, tmp_dir = checkpoint_dir(root, iteration), checkpoint_dir(root, iteration) + ".tmp"
    rank, world = dist.get_rank(), dist.get_world_size()
    PHASE.enter("save")

    def prepare():
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            for name in os.listdir(root):
                if name.endswith((".tmp", ".old")):  # left by a save or a prune that crashed
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            os.makedirs(tmp_dir)

    def write_shards():
        fault_injection.check_save(iteration)
        _in_process_write_results()
        dist_checkpointing.save(state, tmp_dir)
        _maybe_stall_for_fault_test(iteration)

    hashes: dict[str, dict] = {}

    def hash_share():
        # every shard is on disk (the all-gather above is the barrier): hash this rank's part
        hashes.update(manifest.hash_files(
            tmp_dir, manifest.share(manifest.checkpoint_files(tmp_dir), rank, world)))

    def commit():
        if rank != 0:
            return
        merged = {name: entry for part in gathered for name, entry in part.items()}
        missing = set(manifest.checkpoint_files(tmp_dir)) ^ set(merged)
        if missing:
            raise CorruptCheckpointError(f"ranks hashed different file lists ({sorted(missing)})")
        manifest.write_manifest(tmp_dir, iteration, world, merged)  # the last file written
        if os.path.isdir(final_dir):  # re-saving an iteration: keep the old one until replaced
            shutil.rmtree(final_dir)
        os.rename(tmp_dir, final_dir)
        tracker_tmp = os.path.join(root, TRACKER_FILENAME + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER_FILENAME))

    errors = _agree("preparation", prepare, root)
    if not errors:
        errors = _agree("write", write_shards, root)
    if not errors:
        PHASE.enter("save_commit")
        errors = _agree("hashing", hash_share, root)
    if not errors:
        gathered: list = [None] * world
        dist.gather_object(hashes, gathered if rank == 0 else None, dst=0)
        errors = _agree("commit", commit, root)
    if errors:
        hint = _disk_full_hint(root)  # before the cleanup frees the space again
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        errors = [e for e in errors if _ELSEWHERE not in e] or errors
        previous = read_tracker(root) if os.path.isdir(root) else None
        kept = (f"the last complete checkpoint, {checkpoint_dir(root, previous)}, is untouched "
                f"({TRACKER_FILENAME} still names it)" if previous is not None
                else "no earlier checkpoint exists")
        raise CheckpointError(
            f"checkpoint save of iteration {iteration} to {root} failed{hint.replace(';', ':', 1)}"
            f" ({'; '.join(errors)}); {kept}. Free space (or fix the directory) and resume with "
            f"--load {root}")
    if rank == 0 and keep_last:
        _prune(root, iteration, keep_last)
    dist.barrier()
    return final_dir


def _prune(root: str, newest: int, keep_last: int) -> None:
    """Delete complete checkpoints older than the ``keep_last`` newest (``newest`` included),
    once ``newest`` is committed and passes the file checks. Each goes to ``iter_N.old`` first
    (atomic), so a crash mid-delete never leaves a torn ``iter_N`` for ``--load`` to find."""
    if not manifest.verify(checkpoint_dir(root, newest), hash_share=None).ok:
        logger.warning("not pruning %s: the new checkpoint iter_%07d fails its file checks",
                       root, newest)
        return
    iterations = sorted((int(name[5:]) for name in os.listdir(root)
                         if name.startswith("iter_") and name[5:].isdigit()
                         and int(name[5:]) <= newest), reverse=True)
    for old in iterations[keep_last:]:
        doomed = checkpoint_dir(root, old) + ".old"
        os.rename(checkpoint_dir(root, old), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _maybe_stall_for_fault_test(iteration: int) -> None:
    """Fault drills kill the job mid-save; this widens that window on request (env only)."""
    stall_at = os.environ.get("MONTA_TEST_STALL_SAVE_AT_ITER")
    if stall_at is not None and int(stall_at) == iteration:
        time.sleep(float(os.environ.get("MONTA_TEST_STALL_SAVE_S", "60")))


def _loads_optimizer(common: dict, args: argparse.Namespace) -> bool:
    """Whether loading the checkpoint whose common state is ``common`` restores its optimizer
    (it holds one, and neither --finetune nor --no-load-optim says no)."""
    return "optimizer" in common and not (args.finetune or args.no_load_optim)


def load_checkpoint(path: str, model, optimizer, scheduler, args: argparse.Namespace) -> TrainState:
    """Load ``path`` (found and verified by :func:`find_checkpoint`) into model/optimizer.

    Resharding is free: any TP/PP/EP layout loads any other's checkpoint (the distributed
    optimizer's state only across DP: :func:`monta.training.optimizer.optimizer_layout_mismatch`).
    Optimizer and RNG state are skipped for ``--finetune``, ``--no-load-optim`` / ``--no-load-rng``, and RNG
    also when the world size changed (per-rank streams no longer line up). A weights-only
    checkpoint (:func:`save_model_only`, e.g. a converted one) starts a fresh optimizer, with
    the LR schedule moved on to the checkpoint's consumed samples.
    """
    common = dist_checkpointing.load_common_state_dict(path)
    saved_world = common.get("world_size")
    has_optimizer = "optimizer" in common
    has_rng = common.get("has_rng_state", True)
    with_optimizer = _loads_optimizer(common, args)
    with_rng = (not (args.finetune or args.no_load_rng) and has_rng
                and saved_world == dist.get_world_size())
    if (has_rng and saved_world != dist.get_world_size() and not args.no_load_rng
            and dist.get_rank() == 0):
        logger.warning("checkpoint saved with world size %s, running with %s: RNG state not "
                       "restored", saved_world, dist.get_world_size())
    if not has_optimizer and not (args.finetune or args.no_load_optim) and dist.get_rank() == 0:
        logger.warning("checkpoint %s holds weights only (no optimizer state): starting a fresh "
                       "optimizer", path)
    if with_optimizer:
        allocate_distributed_adam_state(optimizer)
    state = _sharded_state_dict(model, optimizer, scheduler, TrainState(), args,
                                with_optimizer=with_optimizer, with_rng=with_rng, is_loading=True)
    loaded = dist_checkpointing.load(state, path)
    if len(model) == 1:
        _unwrap(model[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(model):
            _unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    if args.finetune:
        return TrainState()
    train_state = TrainState(**loaded["train_state"])
    if not has_optimizer and scheduler is not None and train_state.consumed_train_samples:
        scheduler.step(increment=train_state.consumed_train_samples)
    return train_state


# Flags that fix the model's tensors and function; a checkpoint must match them to load.
MODEL_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "position_embedding_type", "rotary_base",
              "normalization", "norm_epsilon", "swiglu", "untie_embeddings_and_output_weights",
              "disable_bias_linear", "num_experts", "moe_router_topk")


def model_arg_values(args: dict) -> dict:
    """The :data:`MODEL_ARGS` of saved or parsed args, defaults resolved (query groups without
    ``--group-query-attention`` = heads; kv channels unset = hidden / heads)."""
    values = {name: args.get(name) for name in MODEL_ARGS}
    heads = args.get("num_attention_heads")
    if not args.get("group_query_attention") or values["num_query_groups"] is None:
        values["num_query_groups"] = heads
    if values["kv_channels"] is None and heads:
        values["kv_channels"] = args.get("hidden_size") // heads
    return values


def check_model_args(path: str, args: argparse.Namespace, vocab_size: int | None,
                     padded_vocab_size: int) -> None:
    """Refuse, before any collective, a checkpoint built for a different model.

    Compares :data:`MODEL_ARGS` with the checkpoint's saved args and the embedding rows with
    this run's padded vocabulary (local file reads only).
    """
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as error:  # a torn or foreign common.pt
        raise CorruptCheckpointError(f"cannot read {path}/common.pt ({type(error).__name__}: {error}); "
                              f"load an earlier iter_* directory") from error
    saved = common.get("args")
    if not isinstance(saved, dict):
        return
    ours, theirs = model_arg_values(vars(args)), model_arg_values(saved)
    diffs = [f"--{name.replace('_', '-')} {ours[name]} here, {theirs[name]} in the checkpoint"
             for name in MODEL_ARGS if ours[name] != theirs[name]]
    saved_vocab = saved.get("vocab_size") if not saved.get("tokenizer_model") else None
    if vocab_size is not None and saved_vocab is not None and saved_vocab != vocab_size:
        diffs.append(f"vocabulary {vocab_size} here, {saved_vocab} in the checkpoint")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was saved for a different model: " + "; ".join(diffs)
            + ". Pass the checkpoint's model flags (a converted checkpoint lists them in "
              "model_flags.txt next to its iter_* directories)")
    if _loads_optimizer(common, args):
        mismatch = optimizer_layout_mismatch(saved, vars(args))
        if mismatch:
            raise CheckpointError(f"checkpoint {path}: {mismatch}; resume with the layout it "
                                  f"was saved with, or add --no-load-optim to keep its weights "
                                  f"and start a fresh optimizer")
    rows = _embedding_rows(path)
    if rows is not None and rows != padded_vocab_size:
        tp = args.tensor_model_parallel_size
        hint = (f"pass --make-vocab-size-divisible-by {rows // tp}" if rows % tp == 0 else
                f"reshard it for --tensor-model-parallel-size {tp} with "
                f"tools/convert_checkpoint.py reshard")
        raise CheckpointError(
            f"checkpoint {path} pads the vocabulary to {rows} rows, this run to "
            f"{padded_vocab_size} (--make-vocab-size-divisible-by "
            f"{args.make_vocab_size_divisible_by} × --tensor-model-parallel-size {tp}); {hint}")


def _embedding_rows(path: str) -> int | None:
    """Rows of the saved embedding (or output layer), from the checkpoint's ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception:  # not readable here: megatron's own load reports it
        return None
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in metadata and hasattr(metadata[key], "size"):
            return int(metadata[key].size[0])
    return None
