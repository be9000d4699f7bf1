#!/usr/bin/env bash
# A small GPT-MoE on 4 CPU ranks: TP=2 + sequence parallel, EP=2, 8 experts, top-2, trained on
# the bundled corpus with the MoNTA dispatcher over two emulated nodes (TP inside a node, EP
# across). This is what `make demo` runs (after `make data`); it prints per-link MoE traffic.
#
#   bash examples/quickstart_cpu.sh             # train (~3 min on 2 cores)
#   bash examples/quickstart_cpu.sh --dry-run   # print the resolved command and layout only
#   bash examples/quickstart_cpu.sh --train-iters 50   # extra flags go to pretrain_moe.py
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
EXTRA=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else EXTRA+=("$arg"); fi
done

NPROC=${NPROC:-4}
RUN_DIR=${RUN_DIR:-runs/quickstart}
DATA_PREFIX=${DATA_PREFIX:-data/bundled_text_document}
TOKENIZER=${TOKENIZER:-monta/data/bundled/tokenizer.model}

CMD=(torchrun --nproc-per-node "$NPROC" pretrain_moe.py
  # parallel layout: DP = 4 / (TP 2 · PP 1) = 2; EP 2 splits the 8 experts 4 + 4
  --tensor-model-parallel-size 2 --sequence-parallel
  --expert-model-parallel-size 2
  # a Mixtral-shaped model, tiny
  --num-layers 4 --hidden-size 128 --num-attention-heads 4
  --group-query-attention --num-query-groups 2
  --ffn-hidden-size 256 --swiglu --normalization RMSNorm
  --position-embedding-type rope --rotary-base 10000
  --untie-embeddings-and-output-weights --disable-bias-linear
  --num-experts 8 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2
  # MoNTA's dispatcher; ranks 0-1 and 2-3 form two emulated nodes, so EP crosses "nodes"
  --moe-token-dispatcher-type monta --ranks-per-node 2
  # data and schedule
  --data-path "$DATA_PREFIX" --tokenizer-model "$TOKENIZER" --split 969,30,1
  --seq-length 128 --micro-batch-size 4 --global-batch-size 16
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --train-iters 150
  --log-interval 20 --eval-interval 75 --eval-iters 4
  --save "$RUN_DIR/checkpoints" --save-interval 75 --load "$RUN_DIR/checkpoints"
  --tensorboard-dir "$RUN_DIR/tensorboard" --exit-signal-handler
  ${EXTRA[@]+"${EXTRA[@]}"}
)

if (( DRY_RUN )); then
  echo "layout: world=$NPROC TP=2 PP=1 DP=$((NPROC / 2)) EP=2 ETP=2 (8 experts, top-2); 2 ranks per node"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
