"""``tools/forward.py``: the logits of MoNTA checkpoints for a batch of token ids.

    # TP2 · EP2 on 4 CPU ranks; the architecture comes from the checkpoint
    torchrun --nproc-per-node 4 tools/forward.py --load ckpt/mixtral --input-ids ids.npy \\
        --output logits.npy --tensor-model-parallel-size 2 --expert-model-parallel-size 2

``--input-ids`` holds ``[B, S]`` integer ids (S divisible by TP). ``--output`` gets ``[B, S, V]``
float32 logits (V: the real vocabulary; padding columns dropped). Several ``--load`` /
``--output`` pairs run one after the other in the same job. The pass runs through
megatron-core's pipeline schedule, so any TP/PP/EP layout the world size allows works.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np
import torch

from monta.convert.errors import ConversionError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forward.py", allow_abbrev=False,
        description="Write the logits of MoNTA checkpoints for a batch of token ids "
                    "(run under torchrun; any layout)")
    p.add_argument("--load", nargs="+", required=True, help="checkpoint roots or iter_N dirs")
    p.add_argument("--input-ids", required=True, help=".npy of [B, S] token ids")
    p.add_argument("--output", nargs="+", required=True, help="one .npy per --load")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    p.add_argument("--moe-token-dispatcher-type", default="alltoall")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="real vocabulary, if the checkpoint's tokenizer file is gone")
    return p


def _plan(opts, path_args: dict, tokens: np.ndarray, world: int):
    """The checkpoint's model args on the requested layout, checked."""
    from monta.convert.job import Layout, args_from_saved, check_layout

    tp = opts.tensor_model_parallel_size
    layout = Layout(tp=tp, pp=opts.pipeline_model_parallel_size,
                    ep=opts.expert_model_parallel_size,
                    etp=opts.expert_tensor_parallel_size or tp)
    args = args_from_saved(path_args, layout)
    batch, seq = tokens.shape
    args.seq_length, args.micro_batch_size = seq, batch
    args.max_position_embeddings = max(args.max_position_embeddings or 0, seq)
    args.moe_token_dispatcher_type = opts.moe_token_dispatcher_type
    args.moe_expert_capacity_factor = None  # dropless: the function HF computes
    args.hidden_dropout = args.attention_dropout = 0.0
    args.bf16 = False
    args.no_load_optim, args.no_load_rng, args.finetune = True, True, False
    check_layout(args, world)
    return args


def _forward(args, model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits ``[B, S, Vp]`` on the last pipeline stage (gathered over TP), else None."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs = []

    def loss_func(output_tensor):
        outputs.append(output_tensor.detach())
        return output_tensor.new_zeros(()), {}

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        return chunk(batch["tokens"], batch["position_ids"], None), loss_func

    batch, seq = tokens.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    data = iter([{"tokens": tokens, "position_ids": position_ids}])
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data,
                                    model=[model], num_microbatches=1, seq_length=seq,
                                    micro_batch_size=batch, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = outputs[0]  # [B, S, Vp/TP]
    group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        pieces = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(pieces, logits.contiguous(), group=group)
        logits = torch.cat(pieces, dim=-1)
    return logits


def run(opts) -> None:
    from megatron.core import parallel_state

    from monta import parallel
    from monta.compat import apply_cpu_patches
    from monta.convert.checkpoint_info import open_checkpoint, real_vocab_size
    from monta.convert.job import build_model
    from monta.training import checkpointing
    from monta.training.validation import validate_parallel_dims

    if len(opts.load) != len(opts.output):
        raise ConversionError(f"{len(opts.load)} --load but {len(opts.output)} --output")
    tokens = np.load(opts.input_ids)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ConversionError(f"--input-ids {opts.input_ids}: expected [B, S] integers, got "
                              f"{tokens.dtype} {tokens.shape}")
    world = parallel.world_size_from_env()
    infos = [open_checkpoint(load) for load in opts.load]
    plans = [_plan(opts, info.args, tokens, world) for info in infos]
    for info, args in zip(infos, plans):
        vocab = real_vocab_size(info.args, opts.vocab_size)
        if vocab is not None and int(tokens.max()) >= vocab:
            raise ConversionError(f"token id {int(tokens.max())} is outside the vocabulary "
                                  f"{vocab} of {info.path}")
        if info.padded_vocab % args.tensor_model_parallel_size:
            raise ConversionError(f"{info.path} pads its vocabulary to {info.padded_vocab} rows, "
                                  f"not divisible by TP {args.tensor_model_parallel_size}; "
                                  f"reshard it first")
    apply_cpu_patches()
    parallel.initialize_distributed(validate_parallel_dims(plans[0], world), None,
                                    plans[0].distributed_timeout_minutes)
    try:
        ids = torch.from_numpy(tokens.astype(np.int64)).to(parallel.device())
        for info, args, output in zip(infos, plans, opts.output):
            parallel.set_seed(args.seed)
            model = build_model(args, info.padded_vocab).to(parallel.device())
            checkpointing.load_checkpoint(info.path, [model], None, None, args)
            logits = _forward(args, model, ids)
            writer = (parallel_state.is_pipeline_last_stage()
                      and parallel_state.get_tensor_model_parallel_rank() == 0
                      and parallel_state.get_data_parallel_rank() == 0)
            if writer:
                vocab = real_vocab_size(info.args, opts.vocab_size) or logits.shape[-1]
                array = logits[..., :vocab].float().cpu().numpy()
                tmp = output + ".tmp.npy"
                np.save(tmp, array)
                os.replace(tmp, output)
                print(f"wrote {output}: logits {array.shape} of {info.path}", flush=True)
            torch.distributed.barrier()
    finally:
        parallel.destroy_distributed()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MONTA_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from monta.compat.warnings_filter import quiet_known_warnings

    quiet_known_warnings()
    opts = build_parser().parse_args(argv)
    try:
        run(opts)
    except ConversionError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
