"""GPU tier (run on a CUDA machine; skipped elsewhere): NCCL, bf16, the MoNTA dispatcher.

    python -m pytest tests/gpu -m gpu -q        # on a machine with one or more GPUs
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nccl_world_of_one():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from monta.compat import apply_cpu_patches

    apply_cpu_patches()  # on a GPU host: only the fixes that also bite without TE
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel()
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _moe_layer(dispatcher: str, options=None, topk: int = 2):
    import torch.nn.functional as F
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from monta.model import gpt_moe_layer_spec

    config = TransformerConfig(
        num_layers=1, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
        num_moe_experts=8, moe_router_topk=topk, moe_router_load_balancing_type="none",
        moe_token_dispatcher_type=dispatcher, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16,
        normalization="RMSNorm", bias_activation_fusion=False)
    if options is not None:
        config.monta_dispatch = options
    torch.manual_seed(0)
    layer = build_module(gpt_moe_layer_spec(config, use_te=False).submodules.mlp, config=config,
                         pg_collection=get_default_pg_collection())
    return layer.cuda()


def test_monta_dispatcher_bf16_matches_stock_on_gpu(nccl_world_of_one):
    from monta.dispatch.monta_dispatcher import DispatchOptions

    stock = _moe_layer("alltoall")
    monta = _moe_layer("monta", DispatchOptions(node_dedup="on", chunks=2))
    monta.load_state_dict(stock.state_dict())
    x = torch.randn(512, 2, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    results = []
    for layer in (stock, monta):
        inp = x.clone().requires_grad_(True)
        out, _ = layer(inp)
        out.backward(grad)
        results.append((out.float(), inp.grad.float(),
                        {n: p.grad.float() for n, p in layer.named_parameters()}))
    (out_s, gin_s, g_s), (out_m, gin_m, g_m) = results
    assert out_m.device.type == "cuda" and out_s.abs().max() > 0.01
    torch.testing.assert_close(out_m, out_s, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gin_m, gin_s, rtol=2e-2, atol=2e-2)
    assert g_m.keys() == g_s.keys() and len(g_m) >= 3
    for name in g_s:
        torch.testing.assert_close(g_m[name], g_s[name], rtol=5e-2, atol=5e-2, msg=name)


def test_pretrain_bf16_on_one_gpu(tmp_path, tiny_data_prefix, tokenizer_model):
    """`torchrun --nproc-per-node 1 pretrain_moe.py --bf16` with the monta dispatcher, on the
    bundled corpus (so there is something to learn)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", "29544", str(REPO / "pretrain_moe.py"), "--bf16",
               "--data-path", tiny_data_prefix, "--tokenizer-model", tokenizer_model,
               "--num-layers", "2", "--hidden-size",
               "256", "--num-attention-heads", "4", "--ffn-hidden-size", "512", "--swiglu",
               "--disable-bias-linear", "--untie-embeddings-and-output-weights",
               "--num-experts", "8", "--moe-router-topk", "2", "--moe-token-dispatcher-type",
               "monta", "--monta-chunks", "2", "--seq-length", "128", "--micro-batch-size", "4",
               "--train-iters", "30", "--lr", "3e-3", "--log-interval", "10", "--eval-iters",
               "0", "--no-progress-bar", "--tensorboard-dir", str(tmp_path / "tb"),
               "--save", str(tmp_path / "ckpt")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("lm loss")}
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1] - 0.5, losses
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "30"
