"""``monta.planner.calibration``: the α-β fit on synthetic data and the size helpers that
``tools/bench_comm.py`` builds its sweep from."""

from __future__ import annotations

import pytest

from monta.planner.calibration import fit_alpha_beta, parse_size, round_size


def test_fit_recovers_alpha_beta():
    alpha, beta = 250e-6, 1.2e9
    points = [(x, alpha + x / beta) for x in (65536, 262144, 1 << 20, 1 << 22, 1 << 24)]
    fit = fit_alpha_beta(points)
    assert fit["latency_s"] == pytest.approx(alpha, rel=1e-6)
    assert fit["bandwidth_Bps"] == pytest.approx(beta, rel=1e-6)
    # a negative intercept is clamped to 0 and β refitted through the origin
    clamped = fit_alpha_beta([(1e6, 0.5e-3), (2e6, 2e-3)])
    assert clamped["latency_s"] == 0.0 and clamped["bandwidth_Bps"] > 0
    assert parse_size("64K") == 65536 and parse_size("16MiB") == 16 << 20
    assert round_size(1000, 3) == 996
