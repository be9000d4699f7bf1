#!/usr/bin/env bash
# Mixtral-8x7B-shaped pre-training on 8-GPU nodes (run on every node, e.g. from slurm/).
# Layout: megatron-core's published recipe, TP1 · EP8 · PP4 with the distributed optimizer
# (64 GPUs = 8 nodes; DP = world / (TP · PP)). EP stays inside a node; MoNTA's dispatcher with
# node dedup and 4 chunks keeps what crosses nodes small.
#
#   NNODES=8 NODE_RANK=0 MASTER_ADDR=host0 bash examples/mixtral_8x7b.sh --data-path ... --tokenizer-model ...
#   bash examples/mixtral_8x7b.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0; EXTRA=()
for arg in "$@"; do if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else EXTRA+=("$arg"); fi; done

NNODES=${NNODES:-8}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}; PP=${PP:-4}; EP=${EP:-8}
WORLD=$((NNODES * GPUS_PER_NODE))
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

CMD=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_moe.py
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" --use-distributed-optimizer
  # Mixtral 8x7B: h 4096, ffn 14336, 32 layers, 32 heads / 8 KV, 8 experts, top-2, θ 1e6
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
  --group-query-attention --num-query-groups 8 --swiglu --normalization RMSNorm
  --position-embedding-type rope --rotary-base 1000000 --untie-embeddings-and-output-weights
  --disable-bias-linear --num-experts 8 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2
  --moe-grouped-gemm --moe-token-dispatcher-type monta --monta-node-dedup auto --monta-chunks 4
  --seq-length 4096 --max-position-embeddings 32768 --micro-batch-size 1 --global-batch-size 256
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 500 --train-iters 100000
  --bf16 --cross-entropy-loss-fusion --log-interval 10 --eval-interval 1000 --eval-iters 10
  --save checkpoints/mixtral_8x7b --load checkpoints/mixtral_8x7b --save-interval 1000
  --tensorboard-dir runs/mixtral_8x7b --exit-signal-handler
  ${EXTRA[@]+"${EXTRA[@]}"})

if (( DRY_RUN )); then
  echo "layout: world=$WORLD ($NNODES nodes x $GPUS_PER_NODE) TP=$TP PP=$PP EP=$EP DP=$((WORLD / (TP * PP)))"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
