#!/usr/bin/env bash
# The multi-GPU run in one command: NCCL correctness of every dispatcher, the paper's
# dispatch+combine comparison, bench_comm's cluster spec, and an end-to-end training comparison
# with MFU and the planner's prediction. Writes bench/results/multigpu_<kind>.json (+ .md).
#
#   bench/multigpu.sh                       # every GPU of this host, two emulated nodes
#   bench/multigpu.sh --kind nvidia-h200-x8 --ranks-per-node 4
#   bench/multigpu.sh --cpu 4 --quick       # the same code on 4 gloo CPU ranks (a dry run)
#   bench/multigpu.sh --dry-run             # print the commands only
#
# Options: --gpus N (default: all visible), --ranks-per-node G (default N/2: two emulated nodes
# of one host's GPUs), --kind NAME (names the result file; default from nvidia-smi), --cpu N
# (gloo ranks instead of GPUs), --quick (tiny sizes), --parts LIST (correctness,dispatch,comm,
# train; default all), --out-dir DIR (scratch; default a temp dir), --dry-run. NO_REPORT=1 stops
# before the report (run bench/multigpu_report.py on the scratch directory elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

# NVLink multicast (NVLS) stays off: the lent machines' fabric does not support it
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::UserWarning"
# TP/SP overlap in megatron needs in-order kernel launch on one connection
export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS="" RPN="" KIND="" CPU="" QUICK="" DRY="" OUT_DIR="" PARTS="correctness,dispatch,comm,train"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) GPUS="$2"; shift 2 ;;
    --ranks-per-node) RPN="$2"; shift 2 ;;
    --kind) KIND="$2"; shift 2 ;;
    --cpu) CPU="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --parts) PARTS="$2"; shift 2 ;;
    --out-dir) OUT_DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bench/multigpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
if [[ -n "$CPU" ]]; then
  N="$CPU"; KIND="${KIND:-cpu-gloo-x$CPU}"
  export CUDA_VISIBLE_DEVICES=""
else
  if ! command -v nvidia-smi >/dev/null; then
    echo "bench/multigpu.sh: no nvidia-smi; pass --cpu N for a gloo dry run" >&2; exit 2
  fi
  N="${GPUS:-$(nvidia-smi -L | wc -l)}"
  KIND="${KIND:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr 'A-Z' 'a-z')-x$N}"
fi
RPN="${RPN:-$(( N > 1 ? N / 2 : 1 ))}"
if (( N < 1 || N % RPN )); then
  echo "bench/multigpu.sh: $N ranks do not split into nodes of $RPN" >&2; exit 2
fi
OUT_DIR="${OUT_DIR:-$(mktemp -d -t multigpu-XXXX)}"
mkdir -p "$OUT_DIR"
RUN="$PY -m torch.distributed.run --nproc-per-node $N --master-port ${MASTER_PORT:-29517}"

if [[ -n "$QUICK" ]]; then
  WORKER_ARGS=(--tiny --seq 256 --reps 3)
  COMM_ARGS=(--max-size 1M --reps 3 --contention-reps 3)
  MODEL=(--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4
         --seq-length 128 --micro-batch-size 2 --num-experts 8 --train-iters 6)
else
  WORKER_ARGS=(--seq 8192 --reps 10)
  COMM_ARGS=(--max-size 256M --reps 10)
  # ~3.4 B parameters (8 layers, 8 experts of 2048 x 8192, top-2): fills 2 H200s with EP=2
  MODEL=(--num-layers 8 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 16
         --seq-length 4096 --micro-batch-size 1 --num-experts 8 --train-iters 20)
fi
TRAIN_COMMON=("${MODEL[@]}" --mock-data --vocab-size 32000 --swiglu --disable-bias-linear
              --normalization RMSNorm --moe-router-topk 2 --moe-router-load-balancing-type none
              --expert-model-parallel-size "$N" --global-batch-size "$(( N * 2 ))"
              --log-interval 1 --eval-iters 0 --eval-interval 100000 --no-progress-bar
              --ranks-per-node "$RPN" ${TRAIN_EXTRA:-})
[[ -z "$CPU" ]] && TRAIN_COMMON+=(--bf16)

run() {  # print, then run unless --dry-run; every step has a wall-clock limit
  echo "+ $*"
  [[ -n "$DRY" ]] || timeout "${STEP_TIMEOUT_S:-1500}" "$@"
}

echo "multigpu: $N ranks ($KIND), nodes of $RPN, scratch $OUT_DIR"
[[ ",$PARTS," == *",correctness,"* || ",$PARTS," == *",dispatch,"* ]] && \
  run $RUN bench/multigpu_worker.py --ranks-per-node "$RPN" --out "$OUT_DIR/worker.json" \
      --parts "$(echo "$PARTS" | tr ',' '\n' | grep -E '^(correctness|dispatch)$' | paste -sd,)" \
      "${WORKER_ARGS[@]}"
[[ ",$PARTS," == *",comm,"* ]] && \
  run $RUN tools/bench_comm.py --ranks-per-node "$RPN" --out "$OUT_DIR/cluster.yaml" \
      --measured-on "$KIND" "${COMM_ARGS[@]}"
if [[ ",$PARTS," == *",train,"* ]]; then
  for d in alltoall monta; do
    extra=()
    # MONTA_ARGS: the monta run's options (default: the static rule, one chunk — tune's trial
    # forwards would fall inside the timed iterations)
    [[ $d == monta ]] && read -r -a extra <<< "${MONTA_ARGS:---monta-node-dedup auto --monta-chunks 1}"
    run $RUN pretrain_moe.py "${TRAIN_COMMON[@]}" --moe-token-dispatcher-type "$d" \
        "${extra[@]}" --tensorboard-dir "$OUT_DIR/tb-$d"
    printf '%s\n' "${TRAIN_COMMON[@]}" --moe-token-dispatcher-type "$d" "${extra[@]}" \
        > "$OUT_DIR/train-$d.args"
  done
fi
[[ -n "${NO_REPORT:-}" ]] || run "$PY" bench/multigpu_report.py --scratch "$OUT_DIR" --kind "$KIND" --world "$N" \
    --ranks-per-node "$RPN" --out "bench/results/multigpu_${KIND}.json"
