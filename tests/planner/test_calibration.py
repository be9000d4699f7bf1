"""``monta.planner.calibration``: the α-β fit on synthetic data and the size helpers that
``tools/bench_comm.py`` builds its sweep from."""

from __future__ import annotations

import pytest

from monta.planner.calibration import (
    fit_alpha_beta, fit_points, parse_size, round_size, unfitted,
)


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


def _point(link, op, nbytes, seconds):
    return {"link": link, "op": op, "bytes": nbytes, "median_s": seconds}


def test_fit_points_and_unfitted():
    """A series whose time falls with size (noise on a fast link) has no bandwidth and is the
    one ``tools/bench_comm.py`` measures at larger sizes; the rest fit per (link, op)."""
    beta = 2e9
    points = [_point("intra", "all_to_all", x, 1e-4 + x / beta) for x in (1 << 16, 1 << 20)]
    points += [_point("inter", "all_to_all", 1 << 16, 3e-3), _point("inter", "all_to_all",
                                                                   1 << 20, 2e-3)]
    points += [_point("inter", "p2p", 1 << 20, 1e-2)]
    fits = fit_points(points)
    assert set(fits) == {"intra", "inter"} and set(fits["inter"]) == {"all_to_all", "p2p"}
    assert fits["intra"]["all_to_all"]["bandwidth_Bps"] == pytest.approx(beta, rel=1e-6)
    assert fits["inter"]["p2p"]["points"] == 1
    assert unfitted(fits) == [("inter", "all_to_all")]
    # a larger size where time does grow gives the series a bandwidth again
    points.append(_point("inter", "all_to_all", 1 << 24, 4e-2))
    assert unfitted(fit_points(points)) == []
