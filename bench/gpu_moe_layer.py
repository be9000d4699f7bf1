"""The MoE-layer section of ``bench/gpu_moe.py``: megatron-core's stock MoE layer against MoNTA's
grouped layers on the same weights, forward + backward, timed one pass at a time and back to back,
with host syncs counted and a profile of the top kernels. Run through ``bench/gpu_moe.py``
(``--sections moe_layer``); ``bench/gpu_moe_gaps.py`` reuses :func:`build_layers`.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def layer_config(shape: dict, dispatcher: str, grouped: bool, device, dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    h = shape["hidden"]
    return TransformerConfig(
        num_layers=1, hidden_size=h, ffn_hidden_size=shape["ffn"],
        moe_ffn_hidden_size=shape["ffn"], num_attention_heads=max(1, h // 128),
        num_moe_experts=shape["experts"], moe_router_topk=shape["topk"],
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bias_activation_fusion=False, normalization="RMSNorm", bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_cpu_initialization=device.type != "cuda")


def build_layers(shape: dict, device, dtype) -> dict:
    """megatron's stock MoE layer and MoNTA's two grouped variants, on the same weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    from monta.experts import copy_from_sequential
    from monta.model import gpt_moe_layer_spec

    pg = get_default_pg_collection()
    torch.manual_seed(0)
    stock_spec = get_gpt_layer_local_spec(num_experts=shape["experts"], moe_grouped_gemm=False,
                                          normalization="RMSNorm").submodules.mlp
    layers = {"megatron_sequential": build_module(
        stock_spec, config=layer_config(shape, "alltoall", False, device, dtype),
        pg_collection=pg)}
    for name, dispatcher in (("monta_grouped", "monta"), ("alltoall_grouped", "alltoall")):
        config = layer_config(shape, dispatcher, True, device, dtype)
        layer = build_module(gpt_moe_layer_spec(config, use_te=False).submodules.mlp,
                             config=config, pg_collection=pg)
        layer.router.load_state_dict(layers["megatron_sequential"].router.state_dict())
        copy_from_sequential(layer.experts, layers["megatron_sequential"].experts)
        layers[name] = layer
    for layer in layers.values():
        layer.to(device).train()
    return layers


def count_host_syncs(fn) -> dict:
    """Operations in ``fn`` that wait for the GPU: stream and device syncs from torch's sync
    debug mode, and waits on CUDA events (which it does not report; the per-expert GEMMs wait
    on their counts' copy so, monta/per_expert_gemm.py)."""
    import warnings

    def where(name: str, line: int) -> str:
        return f"{os.path.relpath(name, REPO) if name.startswith(str(REPO)) else name}:{line}"

    event_waits = []
    real_wait = torch.cuda.Event.synchronize

    def counted_wait(event):
        frame = sys._getframe(1)
        event_waits.append(where(frame.f_code.co_filename, frame.f_lineno))
        return real_wait(event)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        torch.cuda.Event.synchronize = counted_wait
        try:
            fn()
        finally:
            torch.cuda.Event.synchronize = real_wait
            torch.cuda.set_sync_debug_mode("default")

    sites = [where(w.filename, w.lineno) for w in caught
             if "called a synchronizing" in str(w.message)]
    sites += [f"{site} (event)" for site in event_waits]
    return {"count": len(sites), "sites": sorted(set(sites))}


def profile_summary(fn, setup, iters: int = 3, top: int = 12) -> dict:
    """Top kernels by GPU time per iteration, and the CUDA runtime calls that block the host."""
    from torch.profiler import ProfilerActivity, profile

    from monta.training.profiling import busy_us, device_spans, self_device_us

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            setup()  # as in the timed loop: fresh gradients, no accumulation kernels
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
               and self_device_us(e) > 0]
    total = sum(self_device_us(e) for e in kernels)
    rows = [{"kernel": e.key[:110], "ms_per_iter": self_device_us(e) / 1e3 / iters,
             "share": self_device_us(e) / total, "calls_per_iter": e.count / iters}
            for e in sorted(kernels, key=self_device_us, reverse=True)[:top]]
    blocking = {e.key: e.count / iters for e in events
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                             "cudaEventSynchronize", "cudaMemcpy")}
    # kernels on two streams overlap (the weight gradients, monta/wgrad_overlap.py): the sum
    # counts that time twice, the union of their spans does not
    return {"gpu_ms_per_iter": total / 1e3 / iters,
            "gpu_busy_ms_per_iter": busy_us(device_spans(prof)) / 1e3 / iters,
            "top_kernels": rows, "blocking_runtime_calls_per_iter": blocking}


# Passes timed back to back per chained sample (see Timer): the layer as a training step runs it,
# with the host queueing ahead, which a sync-free layer allows and a syncing one does not.
CHAIN = 8


def time_steps(steps: dict, timer, rounds: int, reps: int) -> tuple[dict, dict]:
    """({name: one-pass samples}, {name: back-to-back samples}) in ms of each ``steps`` entry
    {name: (step, clear)}: ``rounds`` interleaved rounds, each step ``reps`` passes between two
    syncs and 2 samples of :data:`CHAIN` passes back to back, after :meth:`Timer.settle`."""
    from bench.gpu_timing import rotated

    one, chained = {name: [] for name in steps}, {name: [] for name in steps}
    for round_ in range(rounds):
        for name, (step, clear) in rotated(list(steps.items()), round_, rounds):
            timer.settle()
            one[name] += timer(step, warmup=2, reps=reps, setup=clear)["samples_ms"]
            chained[name] += timer(step, warmup=1, reps=2, setup=clear,
                                   chain=CHAIN)["samples_ms"]
    return one, chained


def bench_moe_layer(shape: dict, tokens: int, device, dtype, timer, profile: bool,
                    rounds: int = 5, reps: int = 5) -> dict:
    """Each variant timed in ``rounds`` interleaved rounds of ``reps`` (median of all), so
    clock or thermal drift does not favour whichever runs first."""
    from bench.gpu_timing import with_env

    layers = build_layers(shape, device, dtype)
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(tokens // 2, 2, shape["hidden"], device=device, generator=gen).to(dtype)
    grad = torch.randn(x.shape, device=device, generator=gen).to(dtype)
    out = {"tokens": tokens, "variants": {}}
    steps, reference = {}, None
    # MoNTA's layer again with SwiGLU·prob fused into fc1 (monta/swiglu_gemm.py) and as its own
    # kernels, on its grouped kernels only (never per expert, monta/per_expert_gemm.py: no host
    # sync), and with its weight gradients on the current stream (monta/wgrad_overlap.py)
    runs = {name: (layer, None) for name, layer in layers.items()}
    if device.type == "cuda":
        runs["monta_grouped_fused_fwd"] = (layers["monta_grouped"], ("MONTA_FUSED_SWIGLU", "fwd"))
        runs["monta_grouped_unfused"] = (layers["monta_grouped"], ("MONTA_FUSED_SWIGLU", "0"))
        runs["monta_grouped_sync_free"] = (layers["monta_grouped"],
                                           ("MONTA_GROUPED_GEMM", "grouped"))
        runs["monta_grouped_one_stream"] = (layers["monta_grouped"], ("MONTA_WGRAD_STREAM", "0"))
    for name, (layer, env) in runs.items():
        inp = x.clone().requires_grad_(True)

        def under_env(fn, env=env):
            return fn() if env is None else with_env(*env, fn)

        def step(layer=layer, inp=inp, under_env=under_env):
            under_env(lambda: layer(inp)[0].backward(grad))

        def clear(layer=layer, inp=inp):
            inp.grad = None
            for p in layer.parameters():
                p.grad = None

        steps[name] = (step, clear)
        clear()
        result, _ = under_env(lambda: layer(inp))
        result.backward(grad)
        got = (result.detach().float(), inp.grad.float())
        row = out["variants"][name] = {}
        if reference is None:
            reference = got
        else:
            row["rel_err_output"] = ((got[0] - reference[0]).norm() / reference[0].norm()).item()
            row["rel_err_input_grad"] = ((got[1] - reference[1]).norm()
                                         / reference[1].norm()).item()
    samples, chained = time_steps(steps, timer, rounds, reps)
    for name, (step, clear) in steps.items():
        times = samples[name]
        row = out["variants"][name]
        row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                   reps=len(times), chained_median_ms=statistics.median(chained[name]),
                   chained_samples_ms=chained[name], chain=CHAIN)
        if device.type == "cuda":
            clear()
            row["host_syncs"] = count_host_syncs(step)
            if profile:
                row["profile"] = profile_summary(step, clear)
    base = out["variants"]["megatron_sequential"]
    for row in out["variants"].values():
        row["speedup_vs_megatron"] = base["median_ms"] / row["median_ms"]
        row["chained_speedup_vs_megatron"] = base["chained_median_ms"] / row["chained_median_ms"]
    del layers, steps
    return out
