"""bench/gpu_expert_ncu.py on CPU: it reads ncu's raw CSV into one row per labelled GEMM (the
longest kernel of each NVTX range), summarizes against dense, and refuses to run without a GPU."""

import pytest

from bench import gpu_expert_ncu as bench


def _raw_csv(rows):
    metrics = [*bench.METRICS.values(), bench.stall_metric("barrier")]
    header = ["ID", "Process ID", "thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color",
              "Kernel Name", *metrics]
    units = ["", "", "", "", "nsecond", "cycle", "inst", "%", "%", "byte", "%", "%", "inst"]

    def line(cells):
        return ",".join(f'"{c}"' for c in cells)

    body = [line([i, 7, f'7 ""<default domain>:{rng}:none""' if rng else "", kernel, *values])
            for i, (rng, kernel, values) in enumerate(rows)]
    return "\n".join(["==PROF== Connected to process 7", line(header), line(units), *body])


def test_parse_keeps_the_longest_kernel_of_each_labelled_range():
    grouped = ["1,000,000", "1300000", "9394176", "88", "72", "8500000000", "77", "26", "2.4"]
    fill = ["3,000", "2000", "0", "1", "1", "1000", "90", "1", "0.1"]
    dense = ["860,000", "1120000", "8650752", "92", "43", "4300000000", "92", "12", "5.6"]
    text = _raw_csv([("gemm:fc1.forward.routed", "cutlass::device_kernel<GemmUniversal>", grouped),
                     ("gemm:fc1.forward.routed", "monta::fill_group_arrays", fill),
                     ("gemm:fc1.forward.dense", "nvjet_sm90_tst_256x128", dense),
                     ("", "warm-up kernel outside any range", dense)])
    kernels = bench.parse_raw_csv(text)
    assert set(kernels) == {"fc1.forward.routed", "fc1.forward.dense"}
    routed = kernels["fc1.forward.routed"]
    assert routed["kernel"].startswith("cutlass::device_kernel")
    assert routed["duration_ns"] == 1_000_000 and routed["gmma_instructions"] == 9394176
    assert routed["stall_barrier"] == 2.4 and "stall_gmma" not in routed  # not in this CSV
    summary = bench.summarize(kernels)
    assert summary == {"fc1.forward.routed": {"fraction_of_dense": pytest.approx(0.86),
                                              "gmma_over_dense": pytest.approx(9394176 / 8650752)}}
    assert "| fc1.forward.routed | 1000.0 | 9.39 |" in bench.table(kernels)


def test_parse_refuses_output_without_a_csv():
    with pytest.raises(ValueError, match="no ncu CSV header"):
        bench.parse_raw_csv("==ERROR== the profiler could not access the GPU counters")


def test_refuses_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", "/dev/null"])
    assert "needs a CUDA GPU" in capsys.readouterr().err
