"""Pre-train a GPT Mixture-of-Experts model with MoNTA.

    # 4 CPU ranks: TP2 + sequence parallel, EP2, 8 experts, top-2, bundled data
    torchrun --nproc-per-node 4 pretrain_moe.py \
        --tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 \
        --num-experts 8 --moe-router-topk 2 --data-path data/bundled_text_document \
        --tokenizer-model monta/data/bundled/tokenizer.model --save checkpoints/demo

    # see every flag (Megatron-LM names)
    python pretrain_moe.py --help

Exit codes: 0 done (or saved and stopped on SIGTERM with --exit-signal-handler); 2 refused bad
input, an unloadable checkpoint or a failed save ("error: ..." on rank 0); 3 a peer died or a
collective failed or timed out (one line per surviving rank); 4 too many non-finite steps in a
row; 143 SIGTERM without --exit-signal-handler.
"""

import logging
import os
import sys
import time

from monta.training.arguments import parse_args

_RANK0_GRACE_S = 5.0
"""How long ranks other than 0 wait before reporting an error themselves (see main)."""


def main(argv=None) -> int:
    # imported here, not above: it loads torch, and a process multiprocessing spawns re-imports
    # this file (as __mp_main__)
    from monta.compat.warnings_filter import quiet_known_warnings

    logging.basicConfig(level=os.environ.get("MONTA_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_known_warnings()
    args = parse_args(argv)
    from monta.training.checkpointing import CheckpointError
    from monta.training.pretrain import ConfigError, pretrain
    from monta.training.step_guard import EXIT_NONFINITE, NonFiniteError

    try:
        if args.auto_plan:
            from monta.planner.auto import plan_for_args

            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            try:
                vars(args).update(plan_for_args(args, world_size, args.auto_plan))
            except ValueError as error:  # no valid layout, unknown preset, ...
                raise ConfigError(f"--auto-plan {args.auto_plan}: {error}") from error
        pretrain(args)
    except (ConfigError, CheckpointError, FileNotFoundError, NonFiniteError) as error:
        # Every rank fails the same way and rank 0 says so. The others wait for it first:
        # under torchrun the first rank to exit gets the rest stopped, rank 0 with its message
        # unprinted if that was another rank. They are stopped as soon as rank 0 is done, so
        # the wait costs nothing then; if rank 0 never gets there, they say it themselves.
        from monta.training.watchdog import say

        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if rank != 0 and world_size > 1:
            time.sleep(_RANK0_GRACE_S)
            say(f"error (rank {rank}): {error}")
        elif not getattr(error, "reported", False):
            say(f"error: {error}")
        return EXIT_NONFINITE if isinstance(error, NonFiniteError) else 2
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: everything is written and closed by now, and
    # unloading torch and megatron takes seconds per rank (4 ranks on 2 cores: ~5 s a job)
    # while gloo's threads can abort it ("terminate called without an active exception").
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
