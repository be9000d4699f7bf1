"""Convert checkpoints: HF Mixtral ↔ MoNTA, and MoNTA between parallel layouts.

    # HF → MoNTA on TP2 · EP2 (starts 4 local CPU ranks by itself)
    python tools/convert_checkpoint.py hf-to-monta --hf Mixtral-8x7B-v0.1 --save ckpt/mixtral \\
        --tensor-model-parallel-size 2 --expert-model-parallel-size 2
    # MoNTA (any layout) → HF, one process
    python tools/convert_checkpoint.py monta-to-hf --load ckpt/mixtral --save hf_out
    # the same weights on TP1 · EP4 · PP2
    python tools/convert_checkpoint.py reshard --load ckpt/mixtral --save ckpt/tp1ep4pp2 \\
        --expert-model-parallel-size 4 --pipeline-model-parallel-size 2

See docs/conversion.md; `python tools/convert_checkpoint.py COMMAND --help` lists the flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monta.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(script=os.path.abspath(__file__)))
