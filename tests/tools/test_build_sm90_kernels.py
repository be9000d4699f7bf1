"""tools/build_sm90_kernels.py: what it compiles, and (slow) a real build of one config whose
library monta/sm90_gemm.py then loads; no GPU is needed for either."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from monta import sm90_gemm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import build_sm90_kernels  # noqa: E402


def test_each_instance_exports_the_symbols_the_loader_looks_up():
    header = build_sm90_kernels.SOURCE.read_text()
    assert "#define MONTA_GROUPED_GEMM_INSTANCE" in header
    for config, (tm, tn, tk, cm, cn, pingpong) in sm90_gemm.CONFIGS.items():
        for kind in sm90_gemm.KINDS:
            text = build_sm90_kernels.instance_source(config, kind)
            assert f"({sm90_gemm.symbol(config, kind)}, {tm}, {tn}, {tk}, {cm}, {cn}, " \
                   f"{str(pingpong).lower()}, {kind})" in text
            # before any CuTe header: a 176-wide tile needs it for 176-wide wgmma instructions
            assert text.startswith("#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED\n#include")
    for kind in sm90_gemm.KINDS:  # each kind's layouts and runner are defined in the header
        for macro in ("A_COLUMN_MAJOR", "B_COLUMN_MAJOR", "RUN"):
            assert f"#define MONTA_{macro}_{kind} " in header


def test_aligned_instances_use_their_header_for_the_configs_that_have_them():
    header = build_sm90_kernels.ALIGNED_SOURCE.read_text()
    assert "#define MONTA_ALIGNED_GEMM_INSTANCE" in header
    pairs = build_sm90_kernels.instances(sm90_gemm.CONFIGS)
    aligned = {(c, k) for c, k in pairs if k in sm90_gemm.ALIGNED_KINDS}
    assert aligned == {(c, k) for c in sm90_gemm.CONFIGS for k in sm90_gemm.aligned_kinds(c)}
    assert len(pairs) == len(set(pairs)) == 3 * len(sm90_gemm.CONFIGS) + len(aligned) + sum(
        len(configs) for _, configs, _, _ in sm90_gemm.FUSED_KINDS.values())
    for config, kind in aligned:
        tm, tn, tk, cm, cn, pingpong = sm90_gemm.CONFIGS[config]
        base = kind.removeprefix("aligned_")
        text = build_sm90_kernels.instance_source(config, kind)
        assert text.startswith(build_sm90_kernels.PRELUDE + '#include "sm90_aligned_gemm.cuh"')
        assert f"MONTA_ALIGNED_GEMM_INSTANCE({sm90_gemm.symbol(config, kind)}, {tm}, {tn}, " \
               f"{tk}, {cm}, {cn}, {str(pingpong).lower()}, {base})" in text
        assert f"#define MONTA_K_GROUPED_{base} " in header
        # the weight layouts come from the grouped header, which the aligned one includes
        assert f"#define MONTA_B_COLUMN_MAJOR_{base} " in build_sm90_kernels.SOURCE.read_text()
    assert f'#include "{build_sm90_kernels.SOURCE.name}"' in header


@pytest.mark.parametrize("kind, header_name, macro", [
    (sm90_gemm.SWIGLU_DGRAD_KIND, "sm90_swiglu_dgrad.cuh", "MONTA_SWIGLU_DGRAD_INSTANCE"),
    (sm90_gemm.SWIGLU_FC1_KIND, "sm90_swiglu_fc1.cuh", "MONTA_SWIGLU_FC1_INSTANCE")])
def test_a_fused_kind_is_built_for_its_configs_from_its_header(kind, header_name, macro):
    header = build_sm90_kernels.source_of(kind)
    assert header.name == header_name and f"#define {macro}" in header.read_text()
    assert build_sm90_kernels.SOURCE.name in _included(header)
    configs = sm90_gemm.FUSED_KINDS[kind][1]
    pairs = build_sm90_kernels.instances(sm90_gemm.CONFIGS)
    assert {c for c, k in pairs if k == kind} == set(configs)
    others = [c for c in sm90_gemm.CONFIGS if c not in configs]
    assert not any(k == kind for _, k in build_sm90_kernels.instances(others))
    for config in configs:
        tm, tn, tk, cm, cn, pingpong = sm90_gemm.CONFIGS[config]
        text = build_sm90_kernels.instance_source(config, kind)
        assert text.startswith(build_sm90_kernels.PRELUDE + f'#include "{header_name}"')
        assert f"{macro}({sm90_gemm.symbol(config, kind)}, {tm}, {tn}, " \
               f"{tk}, {cm}, {cn}, {str(pingpong).lower()})" in text


def test_an_instance_is_recompiled_when_any_header_or_its_source_changes(tmp_path):
    """Every monta/csrc header counts: the aligned and SwiGLU-gradient instances reach
    sm90_grouped_gemm.cuh through their own header's include, and a header added later may reach
    any instance the same way."""
    import os

    headers = [tmp_path / "a.cuh", tmp_path / "b.cuh"]
    source, obj = tmp_path / "x.cu", tmp_path / "x.o"
    for i, path in enumerate([*headers, source, obj]):
        path.write_text("#include \"a.cuh\"\n" if path == source else "")
        os.utime(path, (1000 + i, 1000 + i))
    assert build_sm90_kernels.up_to_date(obj, source, source.read_text(), headers)
    assert not build_sm90_kernels.up_to_date(obj, source, "another instance", headers)
    os.utime(headers[1], (2000, 2000))
    assert not build_sm90_kernels.up_to_date(obj, source, source.read_text(), headers)
    obj.unlink()
    assert not build_sm90_kernels.up_to_date(obj, source, source.read_text(), headers)
    for header in (build_sm90_kernels.ALIGNED_SOURCE, build_sm90_kernels.SWIGLU_DGRAD_SOURCE,
                   build_sm90_kernels.SWIGLU_FC1_SOURCE):
        assert "sm90_grouped_gemm.cuh" in _included(header)


def _included(header) -> set:
    """The monta/csrc headers ``header`` includes, directly or through one another."""
    import re

    seen, todo = set(), [header]
    while todo:
        for name in re.findall(r'#include "([^"]+)"', todo.pop().read_text()):
            if name not in seen and (header.parent / name).exists():
                seen.add(name)
                todo.append(header.parent / name)
    return seen


def test_an_unknown_config_is_refused_before_anything_is_installed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_sm90_kernels.main(["--configs", "128x256_c1x2,256x512"])
    assert exit_info.value.code == 2
    assert "unknown config(s) ['256x512']" in capsys.readouterr().err


@pytest.mark.slow
def test_building_one_config_gives_a_library_the_loader_accepts(tmp_path):
    """Installs the pinned CUDA 13.0 compiler wheels and CUTLASS headers from the registry (once,
    into build/sm90-toolchain), compiles 128x256_c1x2's six instances (three grouped, three
    tile-aligned), loads the result."""
    library = tmp_path / "libmonta_sm90_gemm.so"
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_sm90_kernels.py"), "--configs",
                    "128x256_c1x2", "--build-dir", str(tmp_path / "objects"), "--out",
                    str(library)], check=True, timeout=840)
    probe = (f"import os; os.environ['MONTA_SM90_GEMM_LIBRARY'] = {str(library)!r}; "
             "from monta import sm90_gemm; "
             "print(sm90_gemm.built_configs(), sm90_gemm.built_configs(aligned=True))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, cwd=ROOT, timeout=60).stdout
    assert out.strip() == "('128x256_c1x2',) ('128x256_c1x2',)"
