"""Invalid configurations and inputs, each run through the real command line (``pretrain_moe.main``).

The fault drill (``tools/fault_drill.py``) runs this module once, in a subprocess::

    python -m monta.testing.bad_inputs --data-prefix P --tokenizer-model M --checkpoint DIR \\
        --workdir W

and reads one JSON line per case: its name, exit code, whether it got past the preflight, and
whether the ``error:`` line holds the expected fragments. Every case must exit 2 with a message
naming the flags or files involved *before any process group exists*: the runner replaces
``monta.parallel.initialize_distributed`` with a function that raises, so a case that would have
reached a collective (and on a real job might hang) fails loudly instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from monta.data.indexed import INDEX_HEADER

# The drill's model (2 layers, hidden 64, 4 experts, top-2): small enough for 4 CPU ranks.
DRILL_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "128", "--swiglu",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--normalization", "RMSNorm",
    "--num-experts", "4", "--moe-router-topk", "2", "--seq-length", "64",
    "--micro-batch-size", "2", "--lr", "1e-3", "--no-progress-bar",
]


@dataclass
class Case:
    """One invalid input: extra flags (``{dir}``, ``{data}``, ``{ckpt}`` are filled in), the world
    size it is launched with, the fragments the error must contain, and optional file setup."""

    name: str
    flags: list[str]
    fragments: list[str]
    world_size: int = 1
    setup: Callable[[str, str], None] | None = None
    """``setup(case_dir, data_prefix)``: create the files the case needs."""
    env: dict[str, str] = field(default_factory=dict)
    keep_bias: bool = False
    """Drop ``--disable-bias-linear`` from the model flags."""
    data: str | None = None
    """Data prefix relative to the case dir (default: the valid one)."""


def write_indexed(prefix: str, documents: list[list[int]], dtype_code: int = 8) -> None:
    """A megatron-core ``.bin``/``.idx`` pair (layout in :mod:`monta.data.indexed`)."""
    dtype = {8: np.uint16, 4: np.int32}[dtype_code]
    lengths = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * np.dtype(dtype).itemsize])
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            f.write(np.asarray(doc, dtype=dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<QBQQ", 1, dtype_code, len(documents),
                                           len(documents) + 1))
        f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes())
        f.write(np.arange(len(documents) + 1, dtype=np.int64).tobytes())


def _copy_data(case_dir: str, data: str, name: str) -> str:
    prefix = os.path.join(case_dir, name)
    for ext in (".bin", ".idx"):
        shutil.copy(data + ext, prefix + ext)
    return prefix


def _truncate_bin(case_dir: str, data: str) -> None:
    prefix = _copy_data(case_dir, data, "cut_text_document")
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size // 2)


def _garbage_idx(case_dir: str, data: str) -> None:
    prefix = _copy_data(case_dir, data, "junk_text_document")
    with open(prefix + ".idx", "wb") as f:
        f.write(os.urandom(256))


def _mismatched_idx(case_dir: str, data: str) -> None:
    # the .idx of another corpus next to this .bin: the sizes disagree
    prefix = _copy_data(case_dir, data, "mixed_text_document")
    write_indexed(os.path.join(case_dir, "other"), [[5, 6, 7]] * 50)
    shutil.copy(os.path.join(case_dir, "other.idx"), prefix + ".idx")


def _other_tokenizer(case_dir: str, data: str) -> None:
    # token ids up to 5999: preprocessed with a larger vocabulary than the 4096-piece tokenizer
    rng = np.random.default_rng(0)
    write_indexed(os.path.join(case_dir, "wide_text_document"),
                  [list(rng.integers(0, 6000, 300)) for _ in range(200)])


def _bad_tokenizer(case_dir: str, data: str) -> None:
    with open(os.path.join(case_dir, "bad.model"), "wb") as f:
        f.write(b"not a sentencepiece model")


def _tracker(text: str, make_dir: bool = False):
    def setup(case_dir: str, data: str) -> None:
        os.makedirs(os.path.join(case_dir, "ckpt"))
        with open(os.path.join(case_dir, "ckpt", "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(text)
        if make_dir:  # a torn checkpoint: common.pt only
            os.makedirs(os.path.join(case_dir, "ckpt", f"iter_{int(text):07d}"))
            with open(os.path.join(case_dir, "ckpt", f"iter_{int(text):07d}", "common.pt"),
                      "wb") as f:
                f.write(b"x")
    return setup


CASES = [
    Case("world_not_divisible_by_tp_pp", ["--tensor-model-parallel-size", "2",
                                          "--pipeline-model-parallel-size", "2",
                                          "--sequence-parallel"], ["world size 6", "= 4"], 6),
    Case("experts_not_divisible_by_ep", ["--expert-model-parallel-size", "3"],
         ["--num-experts 4", "--expert-model-parallel-size 3"], 3),
    Case("heads_not_divisible_by_tp", ["--tensor-model-parallel-size", "3", "--sequence-parallel",
                                       "--seq-length", "66"],
         ["--num-attention-heads 4", "--tensor-model-parallel-size 3"], 3),
    Case("sp_off_with_tp_and_moe", ["--tensor-model-parallel-size", "2"], ["--sequence-parallel"],
         2),
    Case("unknown_dispatcher", ["--moe-token-dispatcher-type", "all2all"], ["'all2all'",
                                                                             "alltoall"]),
    Case("global_batch_mismatch", ["--global-batch-size", "6", "--micro-batch-size", "4"],
         ["--global-batch-size 6", "--micro-batch-size 4"]),
    Case("topk_above_experts", ["--moe-router-topk", "9"], ["--moe-router-topk 9"]),
    Case("layers_not_divisible_by_pp", ["--pipeline-model-parallel-size", "4"],
         ["--num-layers 2", "--pipeline-model-parallel-size 4"], 4),
    Case("query_groups_not_dividing_heads", ["--num-query-groups", "3"],
         ["--num-query-groups 3"]),
    Case("ffn_not_divisible_by_etp", ["--expert-tensor-parallel-size", "3", "--ffn-hidden-size",
                                      "100"],
         ["--ffn-hidden-size 100", "--expert-tensor-parallel-size 3"], 3),
    Case("bias_with_expert_tp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
         ["Bias in Moe"], 2, keep_bias=True),
    Case("save_interval_without_save", ["--save-interval", "5"], ["--save-interval needs --save"]),
    Case("bf16_without_gpu", ["--bf16"], ["--bf16 needs a GPU"]),
    Case("lr_warmup_beyond_decay", ["--lr-warmup-iters", "20", "--lr-decay-iters", "10"],
         ["--lr-warmup-iters 20", "--lr-decay-iters 10"]),
    Case("keep_last_zero", ["--save", "{dir}/out", "--keep-last", "0"],
         ["--keep-last must be >= 1"]),
    Case("max_nonfinite_zero", ["--max-consecutive-nonfinite", "0"],
         ["--max-consecutive-nonfinite must be >= 1"]),
    Case("timeout_zero", ["--distributed-timeout-minutes", "0"],
         ["--distributed-timeout-minutes must be > 0"]),
    Case("bad_fault_injection_spec", [], ["MONTA_FAULT_INJECT", "explode"],
         env={"MONTA_FAULT_INJECT": "explode@iter=3"}),
    Case("missing_data_files", [], ["nothing_text_document"], data="nothing_text_document"),
    Case("truncated_bin", [], ["cut_text_document.bin", "truncated"], setup=_truncate_bin,
         data="cut_text_document"),
    Case("garbage_idx", [], ["junk_text_document.idx", "not a megatron-core index"],
         setup=_garbage_idx, data="junk_text_document"),
    Case("mismatched_idx", [], ["mixed_text_document.bin", "from different runs"],
         setup=_mismatched_idx, data="mixed_text_document"),
    Case("data_from_another_tokenizer", [], ["wide_text_document.bin", "outside the tokenizer's "
                                             "vocabulary of 4096"],
         setup=_other_tokenizer, data="wide_text_document"),
    Case("vocab_size_disagrees_with_tokenizer", ["--vocab-size", "5000"],
         ["--vocab-size 5000 disagrees", "4096 pieces"]),
    Case("missing_tokenizer", ["--tokenizer-model", "{dir}/missing.model"], ["missing.model"]),
    Case("corrupt_tokenizer", ["--tokenizer-model", "{dir}/bad.model"], ["bad.model"],
         setup=_bad_tokenizer),
    Case("load_dir_missing", ["--load", "{dir}/nope"], ["--load", "does not exist"]),
    Case("load_dir_without_tracker", ["--load", "{dir}"], ["latest_checkpointed_iteration.txt"]),
    Case("stale_tracker", ["--load", "{dir}/ckpt"], ["iter_0000040", "stale"],
         setup=_tracker("40")),
    Case("garbage_tracker", ["--load", "{dir}/ckpt"], ["iteration number"],
         setup=_tracker("release?")),
    Case("checkpoint_without_metadata", ["--load", "{dir}/ckpt"], ["metadata.json"],
         setup=_tracker("10", make_dir=True)),
    Case("truncated_shard_no_fallback", ["--load", "{ckpt}", "--no-load-fallback"],
         ["truncated", "--no-load-fallback"]),
    Case("checkpoint_of_another_model", ["--load", "{ckpt}", "--hidden-size", "128",
                                         "--ffn-hidden-size", "256"],
         ["different model", "--hidden-size 128 here, 64 in the checkpoint"]),
    Case("unknown_flag", ["--num-expert", "8"], ["unrecognized arguments: --num-expert"]),
]


class ReachedCollective(RuntimeError):
    """Raised in place of ``initialize_distributed``: the case got past every local check."""


def _refuse_init(*args, **kwargs):
    raise ReachedCollective("reached initialize_distributed")


def run_case(case: Case, workdir: str, data_prefix: str, tokenizer: str,
             checkpoint: str | None) -> dict:
    """Run one case through ``pretrain_moe.main``; a JSON-able result."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    import pretrain_moe

    case_dir = os.path.join(workdir, case.name)
    os.makedirs(case_dir)
    ckpt = None
    if checkpoint is not None and "{ckpt}" in " ".join(case.flags):
        ckpt = os.path.join(case_dir, "ckpt")
        shutil.copytree(checkpoint, ckpt)
        if case.name == "truncated_shard_no_fallback":
            latest = open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip()
            shard = os.path.join(ckpt, f"iter_{int(latest):07d}", "__1_0.distcp")
            with open(shard, "r+b") as f:
                f.truncate(os.path.getsize(shard) // 2)
    if case.setup is not None:
        case.setup(case_dir, data_prefix)
    data = os.path.join(case_dir, case.data) if case.data else data_prefix
    model = [f for f in DRILL_MODEL if not (case.keep_bias and f == "--disable-bias-linear")]
    fill = {"dir": case_dir, "data": data, "ckpt": ckpt or ""}
    argv = [*model, "--data-path", data, "--tokenizer-model", tokenizer,
            *(flag.format(**fill) for flag in case.flags)]
    saved_env = dict(os.environ)
    os.environ.update({"WORLD_SIZE": str(case.world_size), "RANK": "0", **case.env})
    stderr = io.StringIO()
    reached = False
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = pretrain_moe.main(argv)
            except SystemExit as exit_:  # argparse
                code = exit_.code
    except ReachedCollective:
        code, reached = None, True
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    text = stderr.getvalue()
    missing = [frag for frag in case.fragments if frag not in text]
    return {"name": case.name, "code": code, "reached_collective": reached,
            "missing_fragments": missing, "message": text.strip().splitlines()[-1:]}


def run(workdir: str, data_prefix: str, tokenizer: str, checkpoint: str | None) -> list[dict]:
    import torch

    import monta.parallel

    # pretrain() calls it through the module, so this catches every way in
    monta.parallel.initialize_distributed = _refuse_init
    results = []
    for case in CASES:
        if case.name == "bf16_without_gpu" and torch.cuda.is_available():
            continue
        if "{ckpt}" in " ".join(case.flags) and checkpoint is None:
            continue
        results.append(run_case(case, workdir, data_prefix, tokenizer, checkpoint))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description="run the invalid-input cases; JSON lines out")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data-prefix", required=True)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--checkpoint", default=None, help="a --save directory to copy from")
    args = parser.parse_args()
    for result in run(args.workdir, args.data_prefix, args.tokenizer_model, args.checkpoint):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
