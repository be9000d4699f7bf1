"""What a step reports: progress bar, Megatron-style log line (with TFLOP/s per rank and MoE
bytes per link class), TensorBoard / W&B scalars, expert load.

Only the reporting rank (the last rank: it holds the loss under pipeline parallelism) prints
or writes; the collectives that gather the numbers run on every rank.
"""

from __future__ import annotations

import logging
import math
import sys

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils

from monta import comm, parallel
from monta.dispatch.plan import ExpertOrder
from monta.dispatch.stats import take_phase_seconds
from monta.planner.compute import model_flops_per_step
from monta.planner.model import model_from_args
from monta.progress import progress_bar
from monta.training.wandb_writer import open_wandb

logger = logging.getLogger(__name__)


def is_reporting_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1


class ExpertLoadTracker:
    """Counts tokens routed to each expert of each MoE layer, summed over every rank, and —
    with a capacity factor — the token-expert assignments dropped for overflowing an expert.

    Hooks each router's forward, whose outputs are the probabilities and the routing map
    [tokens, experts] after capacity dropping (or, from MoNTA's router on the one-rank path,
    the probabilities [tokens · top-k] in expert order and the order): a kept assignment has a non-zero probability,
    so dropped = tokens × top-k − nonzero(probs) (padding to capacity adds zero-probability
    slots, which are not tokens).
    """

    def __init__(self, model_chunks, num_layers: int, num_experts: int,
                 count_dropped: bool = False):
        # on the job's device: the hook runs every forward and must not copy to the host;
        # columns: tokens per expert, then dropped and routed assignments
        self.counts = torch.zeros(num_layers, num_experts + 2, dtype=torch.float64,
                                  device=parallel.device())
        self.count_dropped = count_dropped
        self._handles = []
        for chunk in model_chunks:
            for name, module in chunk.named_modules():
                if name.endswith("mlp.router"):
                    self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, router, _inputs, outputs) -> None:
        probs, routing_map = outputs[0], outputs[1]
        # MoNTA's router on the one-rank path returns the expert order itself (router.py)
        ordered = isinstance(routing_map, ExpertOrder)
        # layer_number is 1-based and global across pipeline stages
        row = self.counts[router.layer_number - 1]
        row[:-2] += routing_map.tokens_per_expert if ordered else routing_map.detach().sum(dim=0)
        if self.count_dropped:
            routed = probs.numel() if ordered else probs.shape[0] * router.topk
            row[-2] += routed - torch.count_nonzero(probs.detach())
            row[-1] += routed

    def reduce_and_reset(self) -> tuple[torch.Tensor, dict[str, float]]:
        """[layers, experts] token counts since the last call, summed over all ranks, and (with
        a capacity factor) ``{"dropped tokens": n, "dropped-token-fraction": f}``."""
        counts = self.counts.to(dtype=torch.float32)
        # TP ranks route their own sequence shards, DP ranks their own data, PP stages own
        # layers: every routed token is counted exactly once in the world sum.
        dist.all_reduce(counts)
        self.counts.zero_()
        counts = counts.cpu()
        dropped = {}
        if self.count_dropped:
            total, routed = counts[:, -2].sum().item(), counts[:, -1].sum().item()
            dropped = {"dropped tokens": total,
                       "dropped-token-fraction": total / routed if routed else 0.0}
        return counts[:, :-2], dropped


def reduce_moe_traffic(num_layers: int, num_steps: int) -> torch.Tensor:
    """Dispatcher traffic since the last call, per layer, for the whole job, per step.

    Returns:
        [num_layers, 4]: intra bytes, inter bytes (summed over all ranks, forward + backward,
        payload + routing metadata), dispatch seconds, combine seconds (mean over ranks).
    """
    table = torch.zeros(num_layers, 4, dtype=torch.float64)
    for tag, links in comm.LINK_BYTES.by_tag().items():
        layer = _layer_of(tag)
        if layer is not None:
            table[layer - 1, 0] += links["intra"]
            table[layer - 1, 1] += links["inter"]
    for tag, seconds in take_phase_seconds().items():
        layer = _layer_of(tag)
        if layer is not None:
            table[layer - 1, 2 if tag.endswith("/dispatch") else 3] += seconds
    comm.LINK_BYTES.reset()
    reduced = table.to(device=parallel.device())
    dist.all_reduce(reduced)
    reduced = reduced.cpu() / num_steps
    reduced[:, 2:] /= dist.get_world_size()
    return reduced


def _layer_of(tag: str) -> int | None:
    head = tag.split("/", 1)[0]
    if head.startswith("layer") and head[5:].isdigit() and int(head[5:]) > 0:
        return int(head[5:])
    return None


def format_traffic(traffic: torch.Tensor) -> str:
    """One line per log interval: the whole job's MoE dispatcher traffic per step."""
    mb = traffic[:, :2].sum(0) / 1e6
    per_layer = " ".join(
        f"L{i + 1}={row[0] / 1e6:.2f}/{row[1] / 1e6:.2f}MB,{row[2] * 1e3:.1f}/{row[3] * 1e3:.1f}ms"
        for i, row in enumerate(traffic))
    return (f" moe dispatcher traffic per step: intra-node {mb[0]:.3f} MB | inter-node "
            f"{mb[1]:.3f} MB | per layer intra/inter, dispatch/combine: {per_layer}")


def reduce_aux_loss(num_microbatches: int) -> float | None:
    """Mean load-balancing loss per MoE layer for the last step (megatron's tracker)."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        return None
    moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    value = tracker["load_balancing_loss"]["values"].float().mean().item() / num_microbatches
    moe_utils.clear_aux_losses_tracker()
    return value


class TrainingReporter:
    """Progress bar + periodic log line + TensorBoard / W&B, on the reporting rank only."""

    def __init__(self, args, start_iteration: int, vocab_size: int | None = None):
        self.enabled = is_reporting_rank()
        self.writers = []  # TensorBoard's SummaryWriter and/or a WandbWriter: add_scalar(...)
        self.bar = None
        if not self.enabled:
            return
        # model FLOPs of one step, whole job; over seconds and ranks it is TFLOP/s per rank
        self.flops_per_step = step_flops(args, vocab_size)
        self.world_size = dist.get_world_size()
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(SummaryWriter(log_dir=args.tensorboard_dir))
        wandb_writer = open_wandb(args, warn=self.print)
        if wandb_writer is not None:
            self.writers.append(wandb_writer)
        if not args.no_progress_bar:
            self.bar = progress_bar(total=args.train_iters, initial=start_iteration,
                                    desc="train", unit="it", file=sys.stdout)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def _add(self, tag: str, value: float, iteration: int) -> None:
        for writer in self.writers:
            writer.add_scalar(tag, value, iteration)

    def step(self, iteration: int, scalars: dict[str, float], expert_load: torch.Tensor | None,
             traffic: torch.Tensor | None, log_line: bool) -> None:
        if not self.enabled:
            return
        scalars = dict(scalars)
        seconds = max(scalars["iteration-time"], 1e-12)
        scalars["tflops-per-rank"] = self.flops_per_step / seconds / self.world_size / 1e12
        if traffic is not None and traffic[:, :2].sum() > 0:
            # (megatron's allgather dispatcher is not counted: no bytes, no field)
            intra_mb, inter_mb = (traffic[:, :2].sum(0) / 1e6).tolist()
            scalars["moe intra MB"], scalars["moe inter MB"] = intra_mb, inter_mb
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars['lm loss']:.4f}", lr=f"{scalars['lr']:.2e}",
                                 tok_s=f"{scalars['tokens/s']:.0f}", refresh=False)
        if self.writers:
            for name in _WRITTEN_SCALARS:
                value = scalars.get(name)
                if value is not None and math.isfinite(value):
                    self._add(name, value, iteration)
            if expert_load is not None:
                self._write_expert_load(iteration, expert_load)
            if traffic is not None:
                self._write_traffic(iteration, traffic)
        if log_line:
            self.print(format_log_line(iteration, scalars))
            if traffic is not None and traffic[:, :2].sum() > 0:
                self.print(format_traffic(traffic))

    def _write_traffic(self, iteration: int, traffic: torch.Tensor) -> None:
        totals = traffic.sum(0)
        self._add("moe-comm/intra-bytes-per-step", totals[0].item(), iteration)
        self._add("moe-comm/inter-bytes-per-step", totals[1].item(), iteration)
        for layer, (intra, inter, dispatch_s, combine_s) in enumerate(traffic.tolist(), 1):
            self._add(f"moe-comm/layer{layer}/intra-bytes", intra, iteration)
            self._add(f"moe-comm/layer{layer}/inter-bytes", inter, iteration)
            self._add(f"moe-time/layer{layer}/dispatch-ms", dispatch_s * 1e3, iteration)
            self._add(f"moe-time/layer{layer}/combine-ms", combine_s * 1e3, iteration)

    def _write_expert_load(self, iteration: int, load: torch.Tensor) -> None:
        # fraction of routed tokens per expert; 1/E everywhere is perfect balance
        fractions = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        for layer in range(fractions.size(0)):
            for expert in range(fractions.size(1)):
                self._add(f"expert-load/layer{layer + 1}/expert{expert}",
                          fractions[layer, expert].item(), iteration)
        imbalance = (fractions.max(dim=1).values * fractions.size(1)).mean().item()
        self._add("expert-load/max-over-mean", imbalance, iteration)

    def scalars(self, name: str, values: dict[str, float], iteration: int) -> None:
        if self.enabled:
            for key, value in values.items():
                self._add(f"{name}/{key}", value, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for writer in self.writers:
            writer.flush()
            writer.close()


# per-step scalars for TensorBoard / W&B (train_iters is a constant; the MoE MB per step are
# the moe-comm/* scalars again, in bytes, written at log intervals)
_WRITTEN_SCALARS = ("lm loss", "lr", "grad-norm", "load_balancing_loss", "tokens/s",
                    "tflops-per-rank", "iteration-time", "consumed samples", "global batch size",
                    "skipped iterations")


def step_flops(args, vocab_size: int | None) -> float:
    """Model FLOPs of one training step over the whole job (monta.planner.compute's formula:
    attention + router + top-k experts + LM head, × 3 for forward and backward)."""
    model = model_from_args(args, vocab_size)
    return model_flops_per_step(model, args.seq_length, args.global_batch_size,
                                args.tensor_model_parallel_size)


def format_log_line(iteration: int, s: dict[str, float]) -> str:
    """Megatron-LM's familiar one-line format."""
    parts = [
        f" iteration {iteration:8d}/{int(s['train_iters']):8d}",
        f"consumed samples: {int(s['consumed samples']):12d}",
        f"elapsed time per iteration (ms): {s['iteration-time'] * 1000:.1f}",
        f"learning rate: {s['lr']:.6E}",
        f"global batch size: {int(s['global batch size']):5d}",
        f"lm loss: {s['lm loss']:.6E}",
    ]
    if s.get("load_balancing_loss") is not None:
        parts.append(f"load_balancing_loss: {s['load_balancing_loss']:.6E}")
    if s.get("dropped tokens") is not None:
        parts.append(f"dropped tokens: {int(s['dropped tokens'])} "
                     f"({100 * s['dropped-token-fraction']:.1f}%)")
    parts += [f"grad norm: {s['grad-norm']:.3f}", f"tokens/s: {s['tokens/s']:.0f}",
              f"throughput per rank (TFLOP/s): {s['tflops-per-rank']:.4g}"]
    if s.get("moe intra MB") is not None:
        parts.append(f"moe intra/inter-node MB per step: {s['moe intra MB']:.3f}/"
                     f"{s['moe inter MB']:.3f}")
    if s.get("peak memory GiB") is not None:
        parts.append(f"peak memory (GiB): {s['peak memory GiB']:.2f}")
    parts.append(f"skipped iterations: {int(s['skipped iterations'])}")
    return " | ".join(parts) + " |"
