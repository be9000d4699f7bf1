"""``tools/convert_checkpoint.py``: HF Mixtral ↔ MoNTA checkpoints, and resharding.

    # HF → MoNTA for TP2 · EP2 (starts 4 local CPU ranks itself), then train from it
    python tools/convert_checkpoint.py hf-to-monta --hf Mixtral-8x7B-v0.1 --save ckpt/mixtral \\
        --tensor-model-parallel-size 2 --expert-model-parallel-size 2
    # MoNTA → HF (one process; any layout)
    python tools/convert_checkpoint.py monta-to-hf --load ckpt/mixtral --save hf_out
    # a new layout
    python tools/convert_checkpoint.py reshard --load ckpt/mixtral --save ckpt/tp1ep4pp2 \\
        --expert-model-parallel-size 4 --pipeline-model-parallel-size 2

``hf-to-monta`` and ``reshard`` check everything on one process, then run the conversion as a
``torchrun`` job of ``P·lcm(T, E·X)`` gloo ranks on this host (each rank holds only its shard).
Run under ``torchrun`` yourself to pick the ranks (any world size the layout divides).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from monta.convert import hf_config, mixtral
from monta.convert.errors import ConversionError

if TYPE_CHECKING:
    from monta.convert.job import Layout, Source
    from monta.training.checkpointing import TrainState

logger = logging.getLogger(__name__)

MODEL_FLAGS_FILE = "model_flags.txt"


def _add_layout(parser: argparse.ArgumentParser, divisible_default: int | None) -> None:
    g = parser.add_argument_group("target layout")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="defaults to --tensor-model-parallel-size")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=divisible_default,
                   help="vocabulary padded to a multiple of this × TP"
                        + (" (default 128)" if divisible_default else
                           " (default: the source checkpoint's)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", allow_abbrev=False,
        description="HF Mixtral <-> MoNTA checkpoints, and MoNTA between parallel layouts "
                    "(docs/conversion.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf-to-monta", allow_abbrev=False,
                       help="HF Mixtral (config.json + safetensors) → MoNTA checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--save", required=True, help="new MoNTA checkpoint root")
    _add_layout(p, 128)
    p = sub.add_parser("monta-to-hf", allow_abbrev=False,
                       help="MoNTA checkpoint → HF Mixtral directory (one process)")
    p.add_argument("--load", required=True, help="checkpoint root or iter_N directory")
    p.add_argument("--save", required=True, help="new HF model directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: the original HF dtype (converted checkpoints), else the "
                        "checkpoint's")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file")
    p.add_argument("--base-config", default=None,
                   help="config.json whose other fields (token ids, ...) to keep")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="real vocabulary, if the checkpoint's tokenizer file is gone")
    p = sub.add_parser("reshard", allow_abbrev=False,
                       help="MoNTA checkpoint → the same weights on another layout")
    p.add_argument("--load", required=True, help="checkpoint root or iter_N directory")
    p.add_argument("--save", required=True, help="new MoNTA checkpoint root")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="real vocabulary, if the checkpoint's tokenizer file is gone")
    _add_layout(p, None)
    for p in sub.choices.values():
        p.add_argument("--no-progress-bar", action="store_true")
    return parser


@dataclass
class JobPlan:
    """What every rank of a conversion job builds and where it reads from."""

    args: argparse.Namespace  # the model + layout args saved in the new checkpoint
    padded_vocab: int
    layout: "Layout"
    source_factory: Callable[[], "Source"]  # called on each rank
    train_state: "TrainState | None" = None
    model_flags: list[str] | None = None  # for model_flags.txt (hf-to-monta)


def _layout(opts):
    from monta.convert.job import Layout

    tp = opts.tensor_model_parallel_size
    etp = opts.expert_tensor_parallel_size or tp
    return Layout(tp=tp, pp=opts.pipeline_model_parallel_size,
                  ep=opts.expert_model_parallel_size, etp=etp)


def plan_hf_to_monta(opts, verify: bool) -> JobPlan:
    from monta.convert.job import HFSource, apply_layout, check_layout
    from monta.convert.safetensors_io import HFSafetensors
    from monta.model import pad_vocab_size
    from monta.training.arguments import parse_args

    config = hf_config.read_hf_config(opts.hf)
    flags = hf_config.model_flags_from_hf(config)
    dims = mixtral.MixtralDims.from_hf_config(config)
    if verify:
        HFSafetensors(opts.hf).verify(dims.hf_shapes())
    layout = _layout(opts)
    max_pos = int(config.get("max_position_embeddings", 4096))
    args = apply_layout(parse_args([*flags, "--seq-length", str(min(256, max_pos)),
                                    "--make-vocab-size-divisible-by",
                                    str(opts.make_vocab_size_divisible_by)]), layout)
    args.vocab_size = dims.vocab_size
    args.hf_config = config
    check_layout(args, layout.min_world_size)
    padded = pad_vocab_size(dims.vocab_size, layout.tp, opts.make_vocab_size_divisible_by)
    return JobPlan(args, padded, layout, lambda: HFSource(opts.hf, dims), model_flags=flags)


def plan_reshard(opts) -> JobPlan:
    from monta.convert.checkpoint_info import open_checkpoint, real_vocab_size
    from monta.convert.job import MontaSource, args_from_saved, check_layout
    from monta.model import pad_vocab_size
    from monta.training.checkpointing import TrainState

    info = open_checkpoint(opts.load)
    layout = _layout(opts)
    args = args_from_saved(info.args, layout)
    if opts.make_vocab_size_divisible_by is not None:
        args.make_vocab_size_divisible_by = opts.make_vocab_size_divisible_by
    divisible = args.make_vocab_size_divisible_by
    vocab, rows = real_vocab_size(info.args, opts.vocab_size), info.padded_vocab
    if vocab is None:
        if rows % (divisible * layout.tp):
            raise ConversionError(f"{info.path}: its {rows} vocabulary rows do not suit "
                                  f"TP{layout.tp} and its tokenizer is gone; pass --vocab-size N")
        padded, copy_rows = rows, rows
    else:
        padded = pad_vocab_size(vocab, layout.tp, divisible)
        copy_rows = rows if padded == rows else vocab
        if opts.vocab_size is not None:
            args.vocab_size = vocab
    check_layout(args, layout.min_world_size)
    try:
        hf_config.check_mixtral_args(info.args, info.path)
        is_mixtral = True
    except ConversionError:
        is_mixtral = False  # reshard any MoNTA model; shapes are then checked per tensor
    if is_mixtral and vocab is not None:
        dims = mixtral.MixtralDims.from_args(info.args, vocab)
        for key, (lead, shape) in dims.monta_shapes(rows).items():
            if info.reader.global_shape(key) != (*lead, *shape):
                raise ConversionError(f"shape mismatch in {info.path}: {key} is "
                                      f"{info.reader.global_shape(key)}, its args imply "
                                      f"{(*lead, *shape)}")
    train_state = TrainState(**info.train_state) if info.train_state else None
    return JobPlan(args, padded, layout, lambda: MontaSource(info.path, copy_rows),
                   train_state=train_state)


def _run_job(opts, plan: JobPlan, script: str, argv: list[str]) -> int:
    from monta.convert import job

    job.check_save_dir(opts.save)
    if job.is_worker():
        job.run_worker(plan.args, plan.padded_vocab, plan.source_factory, opts.save,
                       plan.train_state, progress=not opts.no_progress_bar)
        if plan.model_flags and os.environ.get("RANK", "0") == "0":
            with open(os.path.join(opts.save, MODEL_FLAGS_FILE), "w") as f:
                f.write(" ".join(plan.model_flags) + "\n")
        return 0
    nproc = plan.layout.min_world_size
    print(f"converting on {nproc} local rank(s) for {plan.layout} "
          f"(vocabulary padded to {plan.padded_vocab})", flush=True)
    code = job.launch(script, argv, nproc)
    if code != 0:
        print(f"error: the conversion job failed (exit code {code}); see its output above",
              file=sys.stderr)
        return 1
    print(f"saved {opts.save} ({plan.layout}, weights only)")
    if plan.model_flags:
        print(f"train from it with: torchrun ... pretrain_moe.py $(cat "
              f"{os.path.join(opts.save, MODEL_FLAGS_FILE)}) --load {opts.save} ...")
    return 0


def main(argv: list[str] | None = None, script: str | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MONTA_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from monta.compat.warnings_filter import quiet_known_warnings

    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    script = script or os.path.abspath(sys.argv[0])
    opts = build_parser().parse_args(argv)
    try:
        if opts.command == "monta-to-hf":
            from monta.convert.safetensors_io import parse_size
            from monta.convert.to_hf import export_to_hf

            files = export_to_hf(opts.load, opts.save, opts.dtype, parse_size(opts.max_shard_size),
                                 opts.base_config, opts.vocab_size,
                                 progress=not opts.no_progress_bar)
            print(f"saved {opts.save}: {', '.join(files)}")
            return 0
        from monta.convert import job

        # ranks of our own job skip the header checks the launcher already ran
        plan = (plan_hf_to_monta(opts, verify=os.environ.get(job.WORKER_ENV) != "1")
                if opts.command == "hf-to-monta" else plan_reshard(opts))
        return _run_job(opts, plan, script, argv)
    except ConversionError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
