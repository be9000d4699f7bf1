"""The pre-training loop: validate → init → build → (load) → train / evaluate / save.

Every check that can fail on bad input runs before the first collective, so a wrong flag or a
missing file is an error message, never a hang.
"""

from __future__ import annotations

import argparse
import logging
import signal
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
from monta.training import checkpointing
from monta.training.config import transformer_config_from_args
from monta.training.metrics import (
    ExpertLoadTracker,
    TrainingReporter,
    is_reporting_rank,
    reduce_aux_loss,
    reduce_moe_traffic,
)
from monta.training.profiling import StepProfiler
from monta.training.validation import ConfigError, validate_args

logger = logging.getLogger(__name__)


def preflight(args: argparse.Namespace, world_size: int):
    """All local checks: flags, tokenizer, data files, checkpoint files. No communication."""
    dims = validate_args(args, world_size, set(DISPATCHERS))
    try:
        config = transformer_config_from_args(args)
    except (AssertionError, ValueError) as error:  # megatron-core's own __post_init__ checks
        raise ConfigError(f"invalid model configuration: {error}") from error
    try:
        tokenizer = build_tokenizer(args.tokenizer_model) if args.tokenizer_model else None
        if not args.mock_data:
            prefixes, _weights = parse_data_path(args.data_path)
            for prefix in prefixes:
                check_data_prefix(prefix)
    except (OSError, ValueError) as error:  # missing or corrupt tokenizer / data files
        raise ConfigError(str(error)) from error
    vocab_size = tokenizer.vocab_size if tokenizer is not None else args.vocab_size
    load_path = None
    if args.load:
        load_path = checkpointing.find_checkpoint(args.load, required=args.load != args.save)
    if load_path is not None:
        padded = pad_vocab_size(vocab_size, args.tensor_model_parallel_size,
                                args.make_vocab_size_divisible_by)
        checkpointing.check_model_args(load_path, args, vocab_size, padded)
    return dims, config, tokenizer, vocab_size, load_path


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


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = parallel.device()
    # non_blocking: a blocking host-to-GPU copy waits for the GPU to drain its queue, which
    # would idle it at every micro-batch while the host launches the next one (batches are
    # pinned, see build_data_iterator)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_lm_loss, batch["loss_mask"])


class _ExitSignal:
    """SIGTERM sets a flag; the loop checks it (collectively) at the end of each step."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.received = True

    def any_rank_received(self) -> bool:
        flag = torch.tensor([int(self.received)], device=parallel.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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
          reporter: TrainingReporter, load_tracker: ExpertLoadTracker) -> None:
    num_microbatches = args.global_batch_size // (args.micro_batch_size * dims.dp)
    forward_backward = get_forward_backward_func()
    exit_signal = _ExitSignal(args.exit_signal_handler)
    config = model[0].config
    config.grad_scale_func = None
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync
    tokens_per_step = args.global_batch_size * args.seq_length
    last_log_iteration = state.iteration
    profiler = StepProfiler(enabled=is_reporting_rank())  # MONTA_PROFILE_STEPS=a:b
    while state.iteration < args.train_iters:
        profiler.step_started(state.iteration + 1)
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = forward_backward(forward_step_func=forward_step, data_iterator=train_iterator,
                                   model=model, num_microbatches=num_microbatches,
                                   seq_length=args.seq_length,
                                   micro_batch_size=args.micro_batch_size, forward_only=False)
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=args.global_batch_size)
        else:
            state.skipped_iterations += 1
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        elapsed = time.perf_counter() - start
        profiler.step_finished(state.iteration)
        log_now = state.iteration % args.log_interval == 0 or state.iteration == args.train_iters
        scalars = {
            "lm loss": _mean_over_dp([o["lm loss"] for o in outputs]),
            "lr": scheduler.get_lr(optimizer.param_groups[0]),
            "grad-norm": float(grad_norm) if grad_norm is not None else float("nan"),
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
        expert_load = load_tracker.reduce_and_reset() if log_now else None
        traffic = None
        if log_now:
            traffic = reduce_moe_traffic(args.num_layers, state.iteration - last_log_iteration)
            last_log_iteration = state.iteration
        reporter.step(state.iteration, scalars, expert_load, traffic, log_line=log_now)

        if args.eval_interval and state.iteration % args.eval_interval == 0 \
                and valid_iterator is not None:
            valid_loss = evaluate(args, model, valid_iterator, num_microbatches)
            state.consumed_valid_samples += args.eval_iters * args.global_batch_size
            reporter.print(f" validation loss at iteration {state.iteration}: {valid_loss:.6E}")
            reporter.scalars("validation", {"lm loss": valid_loss}, state.iteration)

        stop = exit_signal.any_rank_received() if args.exit_signal_handler else False
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
    """Run a whole pre-training job; raises ConfigError/CheckpointError/... on bad input."""
    apply_cpu_patches()
    dims, config, tokenizer, vocab_size, load_path = preflight(args, parallel.world_size_from_env())
    parallel.initialize_distributed(dims, args.distributed_backend, args.distributed_timeout_minutes)
    try:
        topology = detect_topology(args.ranks_per_node)
        parallel.set_topology(topology)
        layout_warnings = validate_layout(topology, groups_from_parallel_state())
        parallel.set_seed(args.seed)
        model = build_model(args, config, vocab_size)
        optimizer, scheduler = build_optimizer(args, model)
        state = checkpointing.TrainState()
        if load_path is not None:
            state = checkpointing.load_checkpoint(load_path, model, optimizer, scheduler, args)
        reporter = TrainingReporter(args, state.iteration)
        for warning in layout_warnings:
            reporter.print(f" warning: {warning}")
        reporter.print(f" parallel layout: {dims}; {topology}; "
                       f"dispatcher: {args.moe_token_dispatcher_type}; "
                       f"parameters on rank 0 of this stage: "
                       f"{sum(p.numel() for p in model[0].parameters()):,}")
        if load_path is not None:
            reporter.print(f" resumed from {load_path} at iteration {state.iteration}")
        train_ds, valid_ds, _ = build_datasets(args, tokenizer, vocab_size)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), dims.dp
        train_iterator = build_data_iterator(train_ds, args.micro_batch_size, dp_rank, dp_size,
                                             state.consumed_train_samples)
        valid_iterator = None
        if valid_ds is not None and len(valid_ds) > 0 and args.eval_iters > 0:
            valid_iterator = build_data_iterator(valid_ds, args.micro_batch_size, dp_rank,
                                                 dp_size, state.consumed_valid_samples)
        load_tracker = ExpertLoadTracker(model, args.num_layers, args.num_experts)
        train(args, dims, model, optimizer, scheduler, state, train_iterator, valid_iterator,
              reporter, load_tracker)
        if args.save and state.iteration == args.train_iters:
            if checkpointing.read_tracker(args.save) != state.iteration:
                path = checkpointing.save_checkpoint(args.save, state, model, optimizer,
                                                     scheduler, args)
                reporter.print(f" saved checkpoint at iteration {state.iteration} to {path}")
        reporter.close()
    finally:
        parallel.destroy_distributed()


__all__ = ["pretrain", "preflight", "ConfigError"]
