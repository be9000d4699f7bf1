#!/usr/bin/env bash
# The MoNTA paper's setting: a "2x70B" MoE (two experts on Llama-2-70B shapes), 16 GPUs in 2 nodes,
# 8K sequences, TP = 8 inside each node and EP = 2 across the nodes. Compare dispatchers with
# DISPATCHER=ds_tp (DeepSpeed-style, the paper's baseline) or DISPATCHER=alltoall.
#
#   NODE_RANK=0 MASTER_ADDR=host0 bash examples/paper_2x70b.sh --data-path ... --tokenizer-model ...
#   bash examples/paper_2x70b.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0; EXTRA=()
for arg in "$@"; do if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else EXTRA+=("$arg"); fi; done

NNODES=${NNODES:-2}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
DISPATCHER=${DISPATCHER:-monta}; TOPK=${TOPK:-2}
TP=8; EP=2; ETP=${ETP:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
MONTA_FLAGS=()
[[ "$DISPATCHER" == monta ]] && MONTA_FLAGS=(--monta-node-dedup auto --monta-chunks 4)

CMD=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_moe.py
  --tensor-model-parallel-size "$TP" --sequence-parallel --expert-model-parallel-size "$EP"
  --expert-tensor-parallel-size "$ETP" --use-distributed-optimizer
  # Llama-2-70B shapes with 2 experts per MoE layer
  --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64
  --group-query-attention --num-query-groups 8 --swiglu --normalization RMSNorm
  --position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear
  --num-experts 2 --moe-router-topk "$TOPK" --moe-token-dispatcher-type "$DISPATCHER"
  ${MONTA_FLAGS[@]+"${MONTA_FLAGS[@]}"}
  --seq-length 8192 --micro-batch-size 1 --global-batch-size 16 --bf16 --cross-entropy-loss-fusion
  --lr 1e-4 --min-lr 1e-5 --train-iters 1000 --log-interval 1 --eval-iters 0
  --tensorboard-dir "runs/paper_2x70b_$DISPATCHER"
  ${EXTRA[@]+"${EXTRA[@]}"})

if (( DRY_RUN )); then
  WORLD=$((NNODES * GPUS_PER_NODE))
  echo "layout: world=$WORLD ($NNODES nodes x $GPUS_PER_NODE) TP=$TP EP=$EP ETP=$ETP DP=$((WORLD / TP)) dispatcher=$DISPATCHER top-$TOPK"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
