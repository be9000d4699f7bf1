"""Build MoNTA's Hopper grouped-GEMM library (monta/_build/libmonta_sm90_gemm.so).

    python tools/build_sm90_kernels.py [--nvcc PATH --cutlass DIR] [--jobs N]

Needs no GPU: it cross-compiles sm_90a machine code. Without --nvcc/--cutlass it installs the
pinned CUDA 13.0 compiler wheels and CUTLASS's headers (the ``nvidia-cutlass`` wheel ships them)
from the package registry into build/sm90-toolchain/ once. Each (config, kind) pair is one
translation unit, compiled in parallel (~50 s each on one core); the C interface keeps the
library independent of the torch build that loads it (see monta/sm90_gemm.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monta import sm90_gemm  # noqa: E402
from monta.expert_gemm import (  # noqa: E402
    ALTERNATIVES, SM90_LARGE_EXPERT_CONFIGS, SM90_SMALL_EXPERT_CONFIGS,
)

TOOLCHAIN = ["nvidia-cuda-nvcc==13.0.88", "nvidia-nvvm==13.0.88", "nvidia-cuda-runtime==13.0.96",
             "nvidia-cuda-crt==13.0.88", "nvidia-cuda-cccl==13.0.85", "nvidia-cutlass==4.2.0.0"]
DEFAULT_CONFIGS = sorted({config
                          for slot in (*SM90_SMALL_EXPERT_CONFIGS, *SM90_LARGE_EXPERT_CONFIGS)
                          for config in slot.split(ALTERNATIVES)})
SOURCE = ROOT / "monta" / "csrc" / "sm90_grouped_gemm.cuh"
ALIGNED_SOURCE = ROOT / "monta" / "csrc" / "sm90_aligned_gemm.cuh"
SWIGLU_DGRAD_SOURCE = ROOT / "monta" / "csrc" / "sm90_swiglu_dgrad.cuh"
SWIGLU_FC1_SOURCE = ROOT / "monta" / "csrc" / "sm90_swiglu_fc1.cuh"
# the fused kinds' headers and instance macros (the macros take the config's six numbers)
FUSED_SOURCES = {sm90_gemm.SWIGLU_DGRAD_KIND: (SWIGLU_DGRAD_SOURCE, "MONTA_SWIGLU_DGRAD_INSTANCE"),
                 sm90_gemm.SWIGLU_FC1_KIND: (SWIGLU_FC1_SOURCE, "MONTA_SWIGLU_FC1_INSTANCE")}
ARCH = "-gencode=arch=compute_90a,code=sm_90a"  # sm_90a: wgmma and setmaxnreg need the "a"
FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", ARCH, "-Xcompiler", "-fPIC"]


def install_toolchain(target: Path) -> tuple[Path, Path]:
    cuda = target / "nvidia" / "cu13"
    if not (cuda / "bin" / "nvcc").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), *TOOLCHAIN], check=True)
        for tool in [*(cuda / "bin").iterdir(), *(cuda / "nvvm" / "bin").iterdir()]:
            if tool.is_file():
                tool.chmod(0o755)
    lib64 = cuda / "lib64"  # nvcc.profile looks for lib64; the wheels install lib
    if not lib64.exists():
        lib64.symlink_to("lib")
    return cuda / "bin" / "nvcc", target / "cutlass_library" / "source"


def up_to_date(obj: Path, source: Path, text: str, headers=None) -> bool:
    """Whether ``obj`` was compiled from ``text`` after the last change to any of ``headers``
    (default: every header in monta/csrc/, since each can reach every instance through the
    others' includes)."""
    headers = list(SOURCE.parent.glob("*.cuh") if headers is None else headers)
    return (obj.exists() and source.exists() and source.read_text() == text
            and obj.stat().st_mtime > max(h.stat().st_mtime for h in headers))


def source_of(kind: str) -> Path:
    if kind in FUSED_SOURCES:
        return FUSED_SOURCES[kind][0]
    return ALIGNED_SOURCE if kind in sm90_gemm.ALIGNED_KINDS else SOURCE


# CuTe picks a tile's wgmma instruction by the widest N that divides the tile's; N other than
# 256, 192, 128, 96, 64, 32, 16 and 8 needs this switch, else a 176-wide tile gets N = 16
# instructions (8-9x the count, 38 % of the SM's peak: bench/results/gpu_expert_ncu_runs/
# 128x176_pp_02ce7da.json). It changes no other config's choice.
PRELUDE = "#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED\n"


def instance_source(config: str, kind: str) -> str:
    tm, tn, tk, cm, cn, pingpong = sm90_gemm.CONFIGS[config]
    if kind in FUSED_SOURCES:
        return (f'{PRELUDE}#include "{source_of(kind).name}"\n'
                f"{FUSED_SOURCES[kind][1]}({sm90_gemm.symbol(config, kind)}, {tm}, {tn}, {tk}, "
                f"{cm}, {cn}, {str(pingpong).lower()})\n")
    aligned = kind in sm90_gemm.ALIGNED_KINDS
    macro = "MONTA_ALIGNED_GEMM_INSTANCE" if aligned else "MONTA_GROUPED_GEMM_INSTANCE"
    base_kind = kind.removeprefix("aligned_")
    return (f'{PRELUDE}#include "{source_of(kind).name}"\n'
            f"{macro}({sm90_gemm.symbol(config, kind)}, {tm}, {tn}, "
            f"{tk}, {cm}, {cn}, {str(pingpong).lower()}, {base_kind})\n")


def instances(configs) -> list:
    """(config, kind) pairs to compile: every kind of each config, the tile-aligned kinds
    of those that have them (monta.sm90_gemm.aligned_kinds) and the fused kinds of the configs
    monta.sm90_gemm.FUSED_KINDS lists for them."""
    return [(c, kind) for c in configs for kind in sm90_gemm.KINDS] + [
        (c, kind) for c in configs for kind in sm90_gemm.aligned_kinds(c)] + [
        (c, kind) for kind, (_, fused_configs, _, _) in sm90_gemm.FUSED_KINDS.items()
        for c in configs if c in fused_configs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvcc", type=Path, help="a CUDA >= 12.4 nvcc (default: pip toolchain)")
    parser.add_argument("--cutlass", type=Path,
                        help="CUTLASS source root holding include/ and tools/util/include/")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "sm90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=sm90_gemm.LIBRARY)
    parser.add_argument("--configs", default=",".join(sm90_gemm.CONFIGS),
                        help="comma-separated subset of monta.sm90_gemm.CONFIGS (the default "
                             f"kernels are {', '.join(DEFAULT_CONFIGS)}; monta.expert_gemm uses "
                             "what is built)")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(sm90_gemm.CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {', '.join(sm90_gemm.CONFIGS)}")

    nvcc, cutlass = args.nvcc, args.cutlass
    if nvcc is None or cutlass is None:
        pip_nvcc, pip_cutlass = install_toolchain(ROOT / "build" / "sm90-toolchain")
        nvcc, cutlass = nvcc or pip_nvcc, cutlass or pip_cutlass
    for needed in (nvcc, cutlass / "include" / "cutlass" / "cutlass.h"):
        if not needed.exists():
            parser.error(f"{needed} does not exist")
    env = dict(os.environ, PATH=f"{nvcc.parent}:{os.environ.get('PATH', '')}")
    includes = [f"-I{SOURCE.parent}", f"-I{cutlass / 'include'}",
                f"-I{cutlass / 'tools' / 'util' / 'include'}"]
    args.build_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(pair):
        config, kind = pair
        stem = args.build_dir / sm90_gemm.symbol(config, kind)
        source, obj = stem.with_suffix(".cu"), stem.with_suffix(".o")
        text = instance_source(config, kind)
        if up_to_date(obj, source, text):
            return obj
        source.write_text(text)
        subprocess.run([str(nvcc), *FLAGS, *includes, "-c", str(source), "-o", str(obj)],
                       check=True, env=env)
        print(f"compiled {obj.name}", flush=True)
        return obj

    pairs = instances(configs)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        objects = list(pool.map(compile_one, pairs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(nvcc), "-shared", "-cudart", "static", ARCH, *map(str, objects), "-o",
                    str(args.out)], check=True, env=env)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {len(pairs)} kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
