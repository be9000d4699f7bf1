"""Write the logits of a MoNTA checkpoint for a batch of token ids (to compare against HF).

    # any layout the world size allows; the architecture comes from the checkpoint
    torchrun --nproc-per-node 4 tools/forward.py --load ckpt/mixtral --input-ids ids.npy \\
        --output logits.npy --tensor-model-parallel-size 2 --expert-model-parallel-size 2

`--input-ids`: a .npy of [B, S] token ids; `--output`: [B, S, V] float32 logits. Several
--load/--output pairs run in one job. See docs/conversion.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monta.convert.logits import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
