"""One canary per CPU patch: with the patch switched off, megatron-core 0.16.1 must still fail
on the code path the patch exists for, and with it on the same call must work. When a canary
fails, megatron-core no longer needs that patch: delete it.

All canaries run inside one 2-rank gloo job (some failures only show with a real group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from monta.compat import PATCHES
from monta.testing.distributed import run_distributed


def _init_model_parallel(ep: int = 1):
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(num_layers=1, hidden_size=16, num_attention_heads=2, num_moe_experts=4,
                  moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                  use_cpu_initialization=True, add_bias_linear=False)
    fields.update(overrides)
    return TransformerConfig(**fields)


def exercise_cuda_current_device():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)


def exercise_cuda_synchronize():
    # the p2p path with batch_p2p_sync (pipeline parallelism) ends with this call
    from megatron.core.pipeline_parallel import p2p_communication

    assert "torch.cuda.synchronize()" in open(p2p_communication.__file__).read()
    torch.cuda.synchronize()


def exercise_te_general_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    router_gating_linear(torch.randn(3, 16), torch.randn(4, 16), None, torch.float32)


def exercise_alltoall_dispatcher_streams():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    _init_model_parallel(ep=2)
    saved = MoEAlltoAllTokenDispatcher.cuda_dtoh_stream
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None if saved is None else saved
    rank = dist.get_rank()
    dispatcher = MoEAlltoAllTokenDispatcher(2, [2 * rank, 2 * rank + 1], config=_config(
        expert_model_parallel_size=2), pg_collection=get_default_pg_collection())
    tokens = torch.randn(6, 16)
    routing_map = torch.zeros(6, 4, dtype=torch.bool)
    routing_map[torch.arange(6), torch.arange(6) % 4] = True  # uneven split across the 2 ranks
    routing_map[0, 3] = True
    probs = routing_map.float() * 0.5
    hidden, probs = dispatcher.dispatch_preprocess(tokens, routing_map, probs)
    dispatcher.token_dispatch(hidden, probs)


def exercise_cuda_literals():
    from megatron.core.transformer.utils import get_default_causal_mask

    for module in ("pipeline_parallel/schedules.py", "optimizer/optimizer.py",
                   "optimizer/clip_grads.py", "utils.py"):
        import megatron.core

        source = open(f"{megatron.core.__path__[0]}/{module}").read()
        assert 'device="cuda"' in source or "device='cuda'" in source, module
    get_default_causal_mask(8)


def exercise_grad_clip_type_check():
    from megatron.core.optimizer import optimizer

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-6)


def exercise_unequal_all_gather():
    from megatron.core.tensor_parallel import mappings

    group = dist.new_group([0, 1])
    mine = torch.full((dist.get_rank() + 1, 3), float(dist.get_rank()))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=[1, 2])
    assert gathered.tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3]


def exercise_torch_norm_sequence_parallel():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    norm = WrappedTorchNorm(_config(normalization="RMSNorm", tensor_model_parallel_size=2,
                                    sequence_parallel=True), 16)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def exercise_rng_tracker():
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        first = torch.rand(3)
    model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first)


def exercise_checkpoint_rng_state():
    from megatron.core import tensor_parallel

    def block(x):  # dropout: the recompute must draw the forward's mask again
        return torch.nn.functional.dropout(x.tanh(), p=0.5) * 3

    x = torch.randn(64, requires_grad=True)
    torch.manual_seed(7)
    tensor_parallel.checkpoint(block, False, x).sum().backward()
    recomputed, x.grad = x.grad, None
    torch.manual_seed(7)
    block(x).sum().backward()
    assert torch.equal(recomputed, x.grad)


def exercise_checkpoint_without_output_fp8():
    from megatron.core import tensor_parallel

    x = torch.randn(16, requires_grad=True)
    checkpoint = tensor_parallel.CheckpointWithoutOutput()
    h = checkpoint.checkpoint(torch.tanh, x)
    y = h * 2
    checkpoint.discard_output_and_register_recompute(y)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * (1 - x.detach().tanh() ** 2))


def _canaries(rank: int, world_size: int) -> dict[str, tuple[str | None, str | None]]:
    """For each patch: (error with the patch off, error with it on) — want (something, None)."""
    from monta.compat import apply_cpu_patches, patch_disabled

    apply_cpu_patches()
    outcome = {}
    for patch in PATCHES:
        exercise = globals()[f"exercise_{patch.name}"]
        with patch_disabled(patch.name):
            try:
                exercise()
                failed_without = None
            except Exception as error:  # any failure counts: it is megatron's own
                failed_without = f"{type(error).__name__}: {error}"
        try:
            exercise()
            failed_with = None
        except Exception as error:
            failed_with = f"{type(error).__name__}: {error}"
        outcome[patch.name] = (failed_without, failed_with)
    return outcome


def test_every_patch_is_still_needed_and_works():
    results = run_distributed(_canaries, 2, timeout_s=180)
    names = {patch.name for patch in PATCHES}
    for rank, outcome in enumerate(results):
        assert set(outcome) == names
        for name, (without, with_patch) in outcome.items():
            assert without is not None, (
                f"rank {rank}: megatron-core no longer fails without patch {name!r}: remove it")
            assert with_patch is None, f"rank {rank}: patch {name!r} does not fix it: {with_patch}"


def test_patches_are_not_applied_on_gpu_hosts(monkeypatch):
    from monta.compat import cpu_patches

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_patches, "_APPLIED", [])
    monkeypatch.setattr(cpu_patches, "_apply", lambda patch: cpu_patches._APPLIED.append(patch.name))
    assert cpu_patches.apply_cpu_patches() == ["te_general_gemm",
                                               "checkpoint_without_output_fp8"]
