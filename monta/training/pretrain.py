"""The pre-training loop: validate → init → build → (load) → train / evaluate / save.

Every check that can fail on bad input runs before the first collective, so a wrong flag or a
missing file is an error message, never a hang. After the process group exists, a watchdog
(:mod:`monta.training.watchdog`) turns a dead peer or a stuck collective into one line and a
non-zero exit within ``--distributed-timeout-minutes``; non-finite steps are skipped
(:mod:`monta.training.step_guard`); a bad checkpoint falls back to the previous good one
(:mod:`monta.training.load_plan`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from monta import comm, parallel
from monta.compat import apply_cpu_patches
from monta.data.dataset import build_data_iterator, build_gpt_datasets, parse_data_path
from monta.data.indexed import check_data_prefix
from monta.data.mock import MockGPTDataset
from monta.data.tokenizer import build_tokenizer
from monta.dispatch import DISPATCHERS
from monta.dispatch.stats import PHASE_SECONDS, take_phase_seconds
from monta.model import build_gpt_moe_model, pad_vocab_size
from monta.topology import detect_topology, groups_from_parallel_state, validate_layout
from monta.training import checkpointing, fault_injection
from monta.training.config import transformer_config_from_args
from monta.training.load_plan import LoadPlan, choose_checkpoint, plan_load
from monta.training.metrics import (
    ExpertLoadTracker,
    TrainingReporter,
    is_reporting_rank,
    reduce_aux_loss,
    reduce_moe_traffic,
)
from monta.training.optimizer import fuse_torch_adam
from monta.training.profiling import StepProfiler
from monta.training.step_guard import NonFiniteCounter, NonFiniteError, guarded_step
from monta.training.validation import ConfigError, validate_args, validate_data_vocabulary
from monta.training.watchdog import PHASE, Watchdog, is_collective_failure, say

logger = logging.getLogger(__name__)


def preflight(args: argparse.Namespace, world_size: int):
    """All local checks: flags, tokenizer, data files, checkpoint files. No communication.

    Returns ``(dims, config, tokenizer, vocab_size, load_plan)``; ``load_plan`` (None: fresh
    start) lists the checkpoints that passed the cheap checks, newest first; which one loads is
    settled collectively by :func:`choose_checkpoint` once the process group exists.
    """
    dims = validate_args(args, world_size, set(DISPATCHERS))
    try:
        config = transformer_config_from_args(args)
    except (AssertionError, ValueError) as error:  # megatron-core's own __post_init__ checks
        raise ConfigError(f"invalid model configuration: {error}") from error
    try:
        fault_injection.parse(os.environ.get(fault_injection.ENV, ""))
        tokenizer = build_tokenizer(args.tokenizer_model) if args.tokenizer_model else None
        if not args.mock_data:
            prefixes, _weights = parse_data_path(args.data_path)
            for prefix in prefixes:
                check_data_prefix(prefix)
    except (OSError, ValueError) as error:  # missing or corrupt tokenizer / data files
        raise ConfigError(str(error)) from error
    vocab_size = tokenizer.vocab_size if tokenizer is not None else args.vocab_size
    if tokenizer is not None:
        validate_data_vocabulary(args, tokenizer.vocab_size)
    plan = None
    if args.load:
        plan = plan_load(args.load, required=args.load != args.save,
                         fallback=not args.no_load_fallback)
    if plan is not None:
        # the model flags against the newest readable candidate; a torn common.pt is one
        # more reason to fall back
        while True:
            try:
                _check_model_args(args, vocab_size, plan.candidates[0])
                break
            except checkpointing.CorruptCheckpointError as error:
                plan.reject(0, str(error))
    return dims, config, tokenizer, vocab_size, plan


def _check_model_args(args, vocab_size: int, path: str) -> None:
    padded = pad_vocab_size(vocab_size, args.tensor_model_parallel_size,
                            args.make_vocab_size_divisible_by)
    checkpointing.check_model_args(path, args, vocab_size, padded)


def build_model(args, config, vocab_size: int):
    model = build_gpt_moe_model(
        config,
        vocab_size=pad_vocab_size(vocab_size, args.tensor_model_parallel_size,
                                  args.make_vocab_size_divisible_by),
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        # bf16 parameters and activations; the optimizer keeps fp32 master weights
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    return [DistributedDataParallel(config, ddp_config, model)]


def build_optimizer(args, model):
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        model,
    )
    if not args.no_adam_fusion:
        fuse_torch_adam(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters > 0 else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=args.lr_decay_iters * args.global_batch_size,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style="constant",
        wsd_decay_steps=args.lr_decay_iters * args.global_batch_size // 10,
        lr_wsd_decay_style="linear",
    )
    return optimizer, scheduler


def build_datasets(args, tokenizer, vocab_size: int):
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    # no test-split samples: nothing reads them, and a tiny corpus may leave that split empty
    num_samples = (args.train_iters * args.global_batch_size, evals * args.global_batch_size, 0)
    if args.mock_data:
        return tuple(MockGPTDataset(n, args.seq_length, vocab_size, args.seed + 7919 * i)
                     for i, n in enumerate(num_samples))
    return build_gpt_datasets(args.data_path, args.split, args.seq_length, args.seed,
                              num_samples, tokenizer)


def _lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    # mean over the micro-batch's unmasked tokens; the schedule divides by #micro-batches
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by #micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def _enter_backward(grad):
    PHASE.enter("backward")


def forward_step(data_iterator, model):
    PHASE.enter("forward")
    batch = next(data_iterator)
    device = parallel.device()
    # non_blocking: a blocking host-to-GPU copy waits for the GPU to drain its queue, which
    # would idle it at every micro-batch while the host launches the next one (batches are
    # pinned, see build_data_iterator)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    if output.requires_grad:  # fires when the backward pass reaches this micro-batch
        output.register_hook(_enter_backward)
    return output, partial(_lm_loss, batch["loss_mask"])


def _finalize_grads(*args, **kwargs):
    PHASE.enter("grad_reduce")
    return finalize_model_grads(*args, **kwargs)


def _mean_over_dp(values: list[torch.Tensor]) -> float:
    if not values:
        return float("nan")
    mean = torch.stack([v.float() for v in values]).mean().reshape(1).to(parallel.device())
    dist.all_reduce(mean, group=parallel_state.get_data_parallel_group())
    return mean.item() / parallel_state.get_data_parallel_world_size()


def evaluate(args, model, valid_iterator, num_microbatches: int) -> float:
    for chunk in model:
        chunk.eval()
    losses = []
    forward_backward = get_forward_backward_func()
    PHASE.enter("eval")
    saved_times = take_phase_seconds()
    # evaluation traffic goes to a throwaway counter: the log reports training steps only
    with torch.no_grad(), comm.count_bytes(comm.LinkBytes()):
        for _ in range(args.eval_iters):
            out = forward_backward(forward_step_func=forward_step, data_iterator=valid_iterator,
                                   model=model, num_microbatches=num_microbatches,
                                   seq_length=args.seq_length,
                                   micro_batch_size=args.micro_batch_size, forward_only=True)
            losses += [o["lm loss"] for o in out]
    for chunk in model:
        chunk.train()
    take_phase_seconds()
    PHASE_SECONDS.update(saved_times)
    return _mean_over_dp(losses)


def train(args, dims, model, optimizer, scheduler, state, train_iterator, valid_iterator,
          reporter: TrainingReporter, load_tracker: ExpertLoadTracker,
          watchdog: Watchdog, profiler: StepProfiler) -> None:
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dims.dp)
    forward_backward = get_forward_backward_func()
    config = model[0].config
    config.grad_scale_func = None
    config.finalize_model_grads_func = _finalize_grads
    config.no_sync_func = model[0].no_sync
    tokens_per_step = args.global_batch_size * args.seq_length
    last_log_iteration = state.iteration
    nonfinite = NonFiniteCounter(args.max_consecutive_nonfinite, state.iteration)
    while state.iteration < args.train_iters:
        profiler.step_started(state.iteration + 1)
        start = time.perf_counter()
        PHASE.iteration = state.iteration + 1
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = forward_backward(forward_step_func=forward_step, data_iterator=train_iterator,
                                   model=model, num_microbatches=num_microbatches,
                                   seq_length=args.seq_length,
                                   micro_batch_size=args.micro_batch_size, forward_only=False)
        PHASE.enter("optimizer")
        outcome = guarded_step(optimizer, [o["lm loss"] for o in outputs],
                               args.exit_signal_handler and watchdog.sigterm_received)
        if outcome.updated:
            scheduler.step(increment=args.global_batch_size)
        else:
            state.skipped_iterations += 1
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        elapsed = time.perf_counter() - start
        PHASE.enter("log")
        profiler.step_finished(state.iteration)
        log_now = state.iteration % args.log_interval == 0 or state.iteration == args.train_iters
        scalars = {
            "lm loss": _mean_over_dp([o["lm loss"] for o in outputs]),
            "lr": scheduler.get_lr(optimizer.param_groups[0]),
            "grad-norm": outcome.grad_norm,
            "load_balancing_loss": reduce_aux_loss(num_microbatches),
            "tokens/s": tokens_per_step / elapsed,
            "iteration-time": elapsed,
            "consumed samples": state.consumed_train_samples,
            "global batch size": args.global_batch_size,
            "skipped iterations": state.skipped_iterations,
            "train_iters": args.train_iters,
        }
        if torch.cuda.is_available():  # this rank's high-water mark of allocated memory
            scalars["peak memory GiB"] = torch.cuda.max_memory_allocated() / 2**30
        expert_load = None
        if log_now:
            expert_load, dropped = load_tracker.reduce_and_reset()
            scalars.update(dropped)
        traffic = None
        if log_now:
            traffic = reduce_moe_traffic(args.num_layers, state.iteration - last_log_iteration)
            last_log_iteration = state.iteration
        reporter.step(state.iteration, scalars, expert_load, traffic, log_line=log_now)
        abort = nonfinite.record(state.iteration, outcome)
        if outcome.nonfinite:
            reporter.print(nonfinite.warning(state.iteration, scalars["lm loss"],
                                             outcome.grad_norm))
        if abort:
            saved = None
            if args.save:  # the skipped steps left weights and optimizer as they were
                saved = checkpointing.save_checkpoint(args.save, state, model, optimizer,
                                                      scheduler, args)
            raise NonFiniteError(nonfinite.abort_message(state.iteration, saved))

        if args.eval_interval and state.iteration % args.eval_interval == 0 \
                and valid_iterator is not None:
            valid_loss = evaluate(args, model, valid_iterator, num_microbatches)
            state.consumed_valid_samples += args.eval_iters * args.global_batch_size
            reporter.print(f" validation loss at iteration {state.iteration}: {valid_loss:.6E}")
            reporter.scalars("validation", {"lm loss": valid_loss}, state.iteration)

        stop = outcome.stop_requested
        interval_exit = args.exit_interval and state.iteration % args.exit_interval == 0
        periodic = args.save_interval and state.iteration % args.save_interval == 0
        if args.save and (periodic or stop or interval_exit):
            path = checkpointing.save_checkpoint(args.save, state, model, optimizer, scheduler, args)
            reporter.print(f" saved checkpoint at iteration {state.iteration} to {path}")
        if stop or interval_exit:
            reason = "SIGTERM" if stop else f"--exit-interval {args.exit_interval}"
            reporter.print(f" exiting at iteration {state.iteration} ({reason})")
            return


def pretrain(args: argparse.Namespace) -> None:
    """Run a whole pre-training job; raises ConfigError/CheckpointError/NonFiniteError on bad
    input, a bad checkpoint or a diverged run. A dead peer or a stuck collective ends the
    process through the watchdog instead (exit code 3, one line naming phase and peer)."""
    apply_cpu_patches()
    dims, config, tokenizer, vocab_size, plan = preflight(args, parallel.world_size_from_env())
    parallel.initialize_distributed(dims, args.distributed_backend, args.distributed_timeout_minutes)
    watchdog = Watchdog(args.distributed_timeout_minutes * 60, args.exit_signal_handler,
                        dist.get_rank(), dist.get_world_size()).start()
    try:
        _run(args, dims, config, tokenizer, vocab_size, plan, watchdog)
    except (ConfigError, checkpointing.CheckpointError, NonFiniteError) as error:
        # every rank raises these together; say it now, before the first rank to exit makes
        # torchrun stop the others (rank 0 might not get to print it afterwards)
        if dist.get_rank() == 0:
            say(f"error: {error}")
        error.reported = True
        raise
    except Exception as error:  # noqa: BLE001 - a broken collective becomes the watchdog's line
        if is_collective_failure(error):
            what = "collective timed out" if "timed out" in str(error).lower() else \
                "collective failed"
            watchdog.fail(what, error=error)
        raise
    finally:
        PHASE.enter("done")
        watchdog.stop()
        parallel.destroy_distributed()


def _run(args, dims, config, tokenizer, vocab_size: int, plan: LoadPlan | None,
         watchdog: Watchdog) -> None:
    # before anything reads a checkpoint: agree on a verified one (all ranks, same verdict)
    load_path = None
    if plan is not None:
        load_path = choose_checkpoint(plan, partial(_check_model_args, args, vocab_size))
    PHASE.enter("setup")
    topology = detect_topology(args.ranks_per_node)
    parallel.set_topology(topology)
    layout_warnings = validate_layout(topology, groups_from_parallel_state())
    parallel.set_seed(args.seed)
    model = build_model(args, config, vocab_size)
    optimizer, scheduler = build_optimizer(args, model)
    state = checkpointing.TrainState()
    if load_path is not None:
        PHASE.enter("load")
        state = checkpointing.load_checkpoint(load_path, model, optimizer, scheduler, args)
    fault_injection.install(model, dist.get_rank())
    reporter = TrainingReporter(args, state.iteration, vocab_size)
    for warning in layout_warnings:
        reporter.print(f" warning: {warning}")
    reporter.print(f" parallel layout: {dims}; {topology}; "
                   f"dispatcher: {args.moe_token_dispatcher_type}; "
                   f"parameters on rank 0 of this stage: "
                   f"{sum(p.numel() for p in model[0].parameters()):,}")
    if load_path is not None:
        reporter.print(f" resumed from {load_path} at iteration {state.iteration}")
    PHASE.enter("data")
    train_ds, valid_ds, _ = build_datasets(args, tokenizer, vocab_size)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), dims.dp
    train_iterator = build_data_iterator(train_ds, args.micro_batch_size, dp_rank, dp_size,
                                         state.consumed_train_samples)
    valid_iterator = None
    if valid_ds is not None and len(valid_ds) > 0 and args.eval_iters > 0:
        valid_iterator = build_data_iterator(valid_ds, args.micro_batch_size, dp_rank,
                                             dp_size, state.consumed_valid_samples)
    load_tracker = ExpertLoadTracker(model, args.num_layers, args.num_experts,
                                     count_dropped=args.moe_expert_capacity_factor is not None)
    try:
        # a profiler window that training leaves early (--train-iters, SIGTERM) still gets
        # its trace when the block ends
        with StepProfiler.from_args(args, dist.get_rank(), is_reporting_rank()) as profiler:
            train(args, dims, model, optimizer, scheduler, state, train_iterator,
                  valid_iterator, reporter, load_tracker, watchdog, profiler)
        if args.save and state.iteration == args.train_iters:
            if checkpointing.read_tracker(args.save) != state.iteration:
                path = checkpointing.save_checkpoint(args.save, state, model, optimizer,
                                                     scheduler, args)
                reporter.print(f" saved checkpoint at iteration {state.iteration} to {path}")
    finally:  # also when a run is aborted: its TensorBoard events up to then are flushed
        reporter.close()


__all__ = ["pretrain", "preflight", "ConfigError", "NonFiniteError"]
