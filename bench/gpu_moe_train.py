"""The training section of ``bench/gpu_moe.py``: ``torchrun --nproc-per-node 1 pretrain_moe.py``
on a ~0.8B-parameter GPT-MoE (mock data, bf16, grouped experts), read back from its log.

Model FLOPs per token: 3 × forward, forward = 2 × every matmul weight a token touches
(attention projections, router, its top-k experts' three matrices, output layer) + causal
attention 2·heads·head_dim·seq (QKᵀ and PV over seq/2 keys on average). MFU = model FLOPs per
second / the dense bf16 peak ``bench/gpu_moe.py`` measured in the same run. Iterations
``TRAIN_PROFILE_STEPS`` run under ``torch.profiler`` (``MONTA_PROFILE_STEPS``, see
``monta/training/profiling.py``) and are left out of the throughput medians.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAIN_MODEL = ["--num-layers", "8", "--hidden-size", "2048", "--num-attention-heads", "16",
               "--group-query-attention", "--num-query-groups", "4", "--ffn-hidden-size", "1536",
               "--num-experts", "8", "--moe-router-topk", "2", "--seq-length", "2048",
               "--max-position-embeddings", "2048", "--vocab-size", "32000"]
# 16 × 2048 tokens per micro-batch: at 4 the host's per-launch overhead, not the GPU, set the
# pace (iteration times jittered by ±10 %)
TRAIN_BATCH = ["--micro-batch-size", "16", "--global-batch-size", "64", "--train-iters", "20"]
TRAIN_PROFILE_STEPS = (16, 18)  # profiled, so left out of the throughput medians
TINY_TRAIN_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                    "--group-query-attention", "--num-query-groups", "2",
                    "--ffn-hidden-size", "96", "--num-experts", "8", "--moe-router-topk", "2",
                    "--seq-length", "64", "--max-position-embeddings", "64",
                    "--vocab-size", "512"]
TINY_TRAIN_BATCH = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6"]
TINY_TRAIN_PROFILE_STEPS = (4, 5)
TRAIN_COMMON = ["--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                "--normalization", "RMSNorm", "--moe-aux-loss-coeff", "1e-2",
                "--moe-token-dispatcher-type", "monta", "--moe-grouped-gemm", "--mock-data",
                "--lr", "3e-4", "--log-interval", "1", "--eval-iters", "0", "--no-progress-bar"]



def model_flops_per_token(args: dict) -> float:
    """Training FLOPs per token (see the module docstring for what is counted)."""
    h, layers, heads = args["hidden_size"], args["num_layers"], args["num_attention_heads"]
    groups, ffn, topk = args["num_query_groups"], args["ffn_hidden_size"], args["moe_router_topk"]
    d, s = h // heads, args["seq_length"]
    per_layer = (2 * h * (heads + 2 * groups) * d  # QKV
                 + 2 * heads * d * h  # output projection
                 + 2 * h * args["num_experts"]  # router
                 + topk * 2 * 3 * h * ffn  # experts: fc1 (gate, up) and fc2
                 + 2 * heads * d * s)  # causal attention: QK^T and PV over s/2 keys
    return 3 * (layers * per_layer + 2 * h * args["vocab_size"])


def _flag_values(flags: list[str]) -> dict:
    values, i = {}, 0
    while i < len(flags):
        name = flags[i].lstrip("-").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            values[name], i = flags[i + 1], i + 2
        else:
            values[name], i = True, i + 1
    return {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in values.items()}


def bench_training(peak_tflops: float | None, tiny: bool, on_gpu: bool, log_path: Path,
                   extra_flags: tuple[str, ...] = (), profile: bool = True) -> dict:
    """``extra_flags`` go after the bench's own (bench/gpu_train_fusions.py varies them);
    ``profile``: the profiled iterations and their summary (off: every iteration counts)."""
    model, batch = (TINY_TRAIN_MODEL, TINY_TRAIN_BATCH) if tiny else (TRAIN_MODEL, TRAIN_BATCH)
    flags = [*model, *batch, *TRAIN_COMMON, *extra_flags] + (["--bf16"] if on_gpu else [])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", "29561", "pretrain_moe.py", *flags]
    window = TINY_TRAIN_PROFILE_STEPS if tiny else TRAIN_PROFILE_STEPS
    profiled = range(*window) if profile else range(0)
    profile_path = log_path.with_suffix(".profile.json")
    profile_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if profile:
        env.update(MONTA_PROFILE_STEPS=f"{window[0]}:{window[1]}",
                   MONTA_PROFILE_OUT=str(profile_path))
    started = time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420, env=env)
    log_path.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"training exited {done.returncode}: {done.stderr[-2000:]}")
    iters = [(int(m.group(1)), float(m.group(2)), float(m.group(3)))
             for m in re.finditer(r"iteration\s+(\d+)/.*?elapsed time per iteration \(ms\): "
                                  r"([\d.]+).*?tokens/s: (\d+)", done.stdout)]
    memory = [float(v) for v in re.findall(r"peak memory \(GiB\): ([\d.]+)", done.stdout)]
    losses = [float(v) for v in re.findall(r"lm loss: ([\d.E+-]+)", done.stdout)]
    params = re.search(r"parameters on rank 0 of this stage: ([\d,]+)", done.stdout)
    skip = max(1, len(iters) // 5)  # the first steps compile and warm up
    steady = [it for it in iters[skip:] if it[0] not in profiled]
    tokens_per_s = statistics.median(t for _, _, t in steady)
    args = _flag_values(flags)
    flops_per_token = model_flops_per_token(args)
    achieved = flops_per_token * tokens_per_s / 1e12
    return {
        "command": "torchrun --nproc-per-node 1 pretrain_moe.py " + " ".join(flags),
        "parameters": int(params.group(1).replace(",", "")) if params else None,
        "tokens_per_step": args["global_batch_size"] * args["seq_length"],
        "steady_iterations": [steady[0][0], steady[-1][0]],
        "iteration_ms_median": statistics.median(ms for _, ms, _ in steady),
        "tokens_per_s": tokens_per_s,
        "model_tflop_per_token": flops_per_token / 1e12,
        "model_tflops": achieved,
        "mfu": achieved / peak_tflops if peak_tflops else None,
        "peak_memory_gib": max(memory) if memory else None,
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "wall_s": time.time() - started,
        "profile": json.loads(profile_path.read_text()) if profile_path.exists() else None,
    }


