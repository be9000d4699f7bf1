"""The probe behind ncu_trim_tiles_c19a77d.csv, kept as it ran (the trimmed tiles exist only at
c19a77d, so it is not part of the bench suite). To re-run it from the repository root:

    git worktree add /tmp/trim c19a77d
    (cd /tmp/trim && python tools/build_sm90_kernels.py --configs 128x128_pp_c1x2)
    mkdir -p scratch/trim && cp -r /tmp/trim/monta scratch/trim/   # its library in monta/_build
    cp bench/results/gpu_expert_kernels_runs/ncu_trim_tiles_probe.py scratch/ncu_trim.py
    ncu --nvtx --nvtx-include "regex:gemm:.*/" --metrics gpu__time_duration.sum,\
sm__inst_executed_pipe_tensor_op_gmma.sum,sm__cycles_active.avg,\
sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
lts__t_bytes.sum --csv --page raw python3 scratch/ncu_trim.py
"""
import os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "trim"))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), ".."))
from monta import sm90_gemm
print(sm90_gemm.__file__, sm90_gemm.built_configs())
from bench.gpu_moe import routed_counts
dev = torch.device("cuda")
h, f, e = 2048, 1408, 64
counts = routed_counts(8192, e, 6, dev)
n = int(counts.sum())
x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
dy = torch.randn(n, 2 * f, device=dev, dtype=torch.bfloat16)
w = torch.randn(e, h, 2 * f, device=dev, dtype=torch.bfloat16) * h ** -0.5
routed = torch.cumsum(counts, 0).to(torch.int32)
cfg = "128x128_pp_c1x2"
def launches():
    for trim in ("1", "0"):
        os.environ["MONTA_SM90_TRIM_TILES"] = trim
        yield f"fc1.forward.trim{trim}", lambda: sm90_gemm.rows(x, w, routed, cfg)
        yield f"fc1.input_grad.trim{trim}", lambda: sm90_gemm.rows(dy, w.transpose(1, 2), routed, cfg)
os.environ["MONTA_SM90_TRIM_TILES"] = "1"
a = sm90_gemm.rows(x, w, routed, cfg)
os.environ["MONTA_SM90_TRIM_TILES"] = "0"
b = sm90_gemm.rows(x, w, routed, cfg)
print("same bits", torch.equal(a, b))
for _ in range(2):
    for label, fn in launches():
        fn()
torch.cuda.synchronize()
for label, fn in launches():
    torch.cuda.nvtx.range_push("gemm:" + label)
    fn()
    torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
