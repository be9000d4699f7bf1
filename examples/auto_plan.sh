#!/usr/bin/env bash
# Let MoNTA's planner pick the layout, then train with it: tools/plan.py ranks TP/PP/EP/ETP, the
# dispatcher, node dedup and chunks for a cluster spec and a model, and this script launches
# `torchrun pretrain_moe.py` with the pick's flags (run it on every node, like mixtral_8x7b.sh).
# (`pretrain_moe.py --auto-plan CLUSTER` does the same inside the job; this shows the plan first.)
#
#   CLUSTER=h100_ndr400 MODEL=mixtral-8x7b NODE_RANK=0 MASTER_ADDR=host0 \
#     bash examples/auto_plan.sh --data-path ... --tokenizer-model ...
#   CLUSTER=bench/results/cluster_mine.yaml MODEL=path/to/config.json bash examples/auto_plan.sh --dry-run
#   MODEL="--num-layers 4 --hidden-size 128 --num-experts 8 --moe-router-topk 2" ...   # flags too
#
# CLUSTER: a preset (a800_hdr200, h100_ndr400, testbed_1gbit) or a YAML from tools/bench_comm.py;
# it also gives the ranks per node. MODEL: a preset (mixtral-8x7b, paper-2x70b, quickstart-tiny),
# an HF config.json / model dir, or pretrain_moe.py model flags. NNODES defaults to the whole
# cluster. PLAN_ARGS: more tools/plan.py options (e.g. "--tp 8 --ep 2"). Flags the planner does
# not choose (data, tokenizer, rotary base, ...) go after the script's own arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0; EXTRA=()
for arg in "$@"; do if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else EXTRA+=("$arg"); fi; done

PYTHON=${PYTHON:-python}
CLUSTER=${CLUSTER:-h100_ndr400}; MODEL=${MODEL:-mixtral-8x7b}
SEQ_LENGTH=${SEQ_LENGTH:-4096}; MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}; PLAN_ARGS=${PLAN_ARGS:-}
NODE_RANK=${NODE_RANK:-0}; MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
RUN=${RUN:-checkpoints/auto_plan}

PLAN_CMD=("$PYTHON" tools/plan.py --cluster "$CLUSTER" --model="$MODEL" --json -
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH_SIZE"
  --global-batch-size "$GLOBAL_BATCH_SIZE")
if [[ -n "${NNODES:-}" ]]; then
  # the cluster spec's ranks per node × the nodes this job gets
  RPN=$("$PYTHON" -c 'import sys; from monta.planner import load_cluster
print(load_cluster(sys.argv[1]).ranks_per_node)' "$CLUSTER")
  PLAN_CMD+=(--world $((NNODES * RPN)))
fi
# shellcheck disable=SC2206  # PLAN_ARGS is a list of plan.py options, split on spaces
PLAN_CMD+=($PLAN_ARGS)
if ! PLAN_JSON=$("${PLAN_CMD[@]}"); then
  echo "error: tools/plan.py found no plan for CLUSTER=$CLUSTER MODEL=$MODEL (its message is above)" >&2
  exit 1
fi
# The pick as shell variables (shlex-quoted by Python, so eval only ever sees assignments).
PLAN_VARS=$("$PYTHON" -c '
import json, shlex, sys
best = json.load(sys.stdin)["best"]
c = best["candidate"]
print("PLAN_FLAGS=(" + " ".join(shlex.quote(f) for f in best["flags"]) + ")")
for name, value in (("NODES", best["nodes"]), ("RPN", best["ranks_per_node"]),
                    ("WORLD", best["world_size"]), ("DP", best["dp"]), ("TP", c["tp"]),
                    ("PP", c["pp"]), ("EP", c["ep"]), ("ETP", c["etp"]),
                    ("LABEL", best["label"]), ("STEP_MS", round(best["step_time_s"] * 1e3, 1)),
                    ("MEM_GB", round(best["memory_GB"]["total_GB"], 1)),
                    ("WHY", "; ".join(best["why"]))):
    print(f"PLAN_{name}={shlex.quote(str(value))}")
' <<< "$PLAN_JSON")
eval "$PLAN_VARS"

export CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
CMD=(torchrun --nnodes "$PLAN_NODES" --nproc-per-node "$PLAN_RPN" --node-rank "$NODE_RANK"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_moe.py
  "${PLAN_FLAGS[@]}"
  # what the planner leaves to you: schedule, checkpoints, logging
  --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 500 --train-iters 100000
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --save "$RUN" --load "$RUN" --save-interval 1000 --exit-signal-handler
  --tensorboard-dir "runs/$(basename "$RUN")"
  ${EXTRA[@]+"${EXTRA[@]}"})

if (( DRY_RUN )); then
  echo "plan: $PLAN_LABEL on $CLUSTER: predicted $PLAN_STEP_MS ms/step, $PLAN_MEM_GB GB/rank"
  echo "why: $PLAN_WHY"
  echo "layout: world=$PLAN_WORLD ($PLAN_NODES nodes x $PLAN_RPN) TP=$PLAN_TP PP=$PLAN_PP EP=$PLAN_EP ETP=$PLAN_ETP DP=$PLAN_DP"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
