"""Skip optimizer steps whose loss or gradient norm is not finite; stop after too many in a row.

megatron-core's fp16 loss scaler skips steps with inf/NaN gradients (``update_successful`` False),
but fp32 and bf16 have no scaler: a NaN there would be written into the weights and Adam's
moments, and every later step would be NaN too. :func:`guarded_step` is megatron's
``ChainedOptimizer.step`` with one check between the gradient norm and the update, made
collectively so every rank skips the same steps: the loss is known only on the last pipeline
stage, and a NaN on one data-parallel rank must not let the others update.

The check rides on one small all-reduce per step, which also carries the SIGTERM flag of
``--exit-signal-handler`` (so that costs no extra collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
# looked up at call time through megatron's optimizer module, where monta.compat's CPU patch
# replaces it
from megatron.core.optimizer import optimizer as megatron_optimizer

from monta import parallel

EXIT_NONFINITE = 4
"""Exit code after ``--max-consecutive-nonfinite`` non-finite steps in a row."""


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message says what was saved and what to try."""


@dataclass(frozen=True)
class StepOutcome:
    updated: bool
    """The weights moved (False: skipped)."""
    nonfinite: bool
    """Skipped because some rank's loss or the gradient norm was inf/NaN."""
    grad_norm: float
    stop_requested: bool
    """Some rank received SIGTERM (with ``--exit-signal-handler``)."""


def guarded_step(optimizer, losses: list[torch.Tensor], sigterm: bool) -> StepOutcome:
    """Clip and step ``optimizer`` (a megatron ``ChainedOptimizer``) unless any rank's loss or
    the global gradient norm is not finite.

    Args:
        optimizer: from ``get_megatron_optimizer``.
        losses: this rank's per-micro-batch losses (empty off the last pipeline stage).
        sigterm: this rank received SIGTERM (to be agreed on, like the verdict).
    """
    found_inf = optimizer.prepare_grads()  # the fp16 scaler's own check; False otherwise
    grad_norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
    flags = torch.zeros(3, device=parallel.device())  # [loss bad, grad norm bad, SIGTERM]
    if losses:
        # on device: read back only after the all-reduce, with the grad norm's own sync
        flags[0] = (~torch.isfinite(torch.stack([loss.float() for loss in losses]))).any()
    flags[1] = float(not found_inf and not math.isfinite(grad_norm))
    flags[2] = float(sigterm)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, norm_bad, stop = (bool(v) for v in flags.tolist())
    if found_inf or loss_bad or norm_bad:
        return StepOutcome(False, loss_bad or norm_bad, grad_norm, stop)
    # as megatron's ChainedOptimizer.step: clip every sub-optimizer by the global norm
    for sub in optimizer.chained_optimizers:
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0.0:
            continue
        params = sub.get_parameters()
        if params:
            megatron_optimizer.clip_grad_by_total_norm_fp32(
                params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return StepOutcome(optimizer.step_with_ready_grads(), False, grad_norm, stop)


class NonFiniteCounter:
    """Counts non-finite steps in a row against ``--max-consecutive-nonfinite``."""

    def __init__(self, limit: int, start_iteration: int):
        self.limit = limit
        self.in_a_row = 0
        self.last_good = start_iteration
        """The last iteration whose update was applied (its weights are the current ones)."""

    def record(self, iteration: int, outcome: StepOutcome) -> bool:
        """Note ``iteration``'s outcome; True when the limit is reached (abort)."""
        if outcome.nonfinite:
            self.in_a_row += 1
        elif outcome.updated:
            self.in_a_row = 0
            self.last_good = iteration
        return self.in_a_row >= self.limit

    def warning(self, iteration: int, loss: float, grad_norm: float) -> str:
        return (f" iteration {iteration}: non-finite lm loss {loss} / grad norm {grad_norm}: step "
                f"skipped, weights unchanged ({self.in_a_row} in a row; abort at "
                f"--max-consecutive-nonfinite {self.limit})")

    def abort_message(self, iteration: int, saved: str | None) -> str:
        first = iteration - self.in_a_row + 1
        kept = (f"saved the last good state (weights and optimizer from iteration "
                f"{self.last_good}, data position after iteration {iteration}) to {saved}"
                if saved else "nothing saved (no --save)")
        return (f"{self.in_a_row} consecutive iterations ({first}-{iteration}) had a non-finite "
                f"loss or gradient norm (--max-consecutive-nonfinite {self.limit}); {kept}. "
                f"Lower --lr, raise --lr-warmup-iters or check the data, then resume with --load")
