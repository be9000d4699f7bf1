"""The multi-rank harness: results come back, failures and hangs surface quickly.

The tests here also call ``run_distributed`` several times in one session, as the suites do.
"""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

import monta.testing.distributed as distributed
from monta.testing import run_distributed

WORLD_SIZE = 4


def _sum_of_ranks(rank: int, world_size: int, scale: float) -> dict:
    """Every rank all-reduces its rank; returns env facts the harness promises."""
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "sum": t.item() * scale,
        "tensor": torch.arange(3) + rank,
        "extra_env": os.environ.get("MONTA_TEST_FLAG"),
        "threads": torch.get_num_threads(),
    }


def _rank2_raises(rank: int, world_size: int) -> None:
    if rank == 2:
        raise ValueError("deliberate failure on rank two")
    dist.barrier()  # the others block here until the harness kills them


def _rank1_exits(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(7)
    dist.barrier()


def _sleep_forever(seconds: float) -> None:
    time.sleep(seconds)


def _rank1_hangs(rank: int, world_size: int) -> None:
    if rank == 1:
        _sleep_forever(3600.0)
    dist.barrier()


def test_results_come_back_in_rank_order():
    results = run_distributed(
        _sum_of_ranks, WORLD_SIZE, 2.0, timeout_s=60, env={"MONTA_TEST_FLAG": "on"}
    )
    assert [r["rank"] for r in results] == list(range(WORLD_SIZE))
    assert [r["dist_rank"] for r in results] == list(range(WORLD_SIZE))
    assert all(r["world_size"] == WORLD_SIZE and r["backend"] == "gloo" for r in results)
    assert all(r["sum"] == 2.0 * sum(range(WORLD_SIZE)) for r in results)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["tensor"], torch.arange(3) + rank)
    assert all(r["extra_env"] == "on" for r in results)
    assert all(r["threads"] == 1 for r in results)
    # The parent's environment is left as it was.
    assert "MONTA_TEST_FLAG" not in os.environ


def test_raising_rank_surfaces_its_traceback_promptly():
    start = time.monotonic()
    with pytest.raises(RuntimeError) as excinfo:
        run_distributed(_rank2_raises, WORLD_SIZE, timeout_s=60)
    message = str(excinfo.value)
    assert "rank 2 of 4" in message
    assert "deliberate failure on rank two" in message
    assert "Traceback" in message and "_rank2_raises" in message
    # The blocked ranks were killed, not waited for.
    assert time.monotonic() - start < 30


def test_rank_dying_without_result_is_reported():
    with pytest.raises(RuntimeError, match=r"rank 1 of 4 exited with code 7"):
        run_distributed(_rank1_exits, WORLD_SIZE, timeout_s=60)


def test_hanging_rank_times_out_and_is_named():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as excinfo:
        run_distributed(_rank1_hangs, WORLD_SIZE, timeout_s=20)
    elapsed = time.monotonic() - start
    message = str(excinfo.value)
    assert "still running after 20.0 s" in message
    assert "Inside a torch.distributed call: [0, 2, 3]; elsewhere: [1]" in message
    # Rank 1 is named and its stack shows where it hangs; the others wait in the barrier.
    rank1 = message.split("rank 1:")[1].split("rank 2:")[0]
    assert "_sleep_forever" in rank1
    rank0 = message.split("rank 0:")[1].split("rank 1:")[0]
    assert "_rank1_hangs" in rank0 and "_sleep_forever" not in rank0
    assert elapsed < 20 + 10


def test_unpicklable_fn_is_refused_before_spawning():
    with pytest.raises(TypeError, match="must be picklable"):
        run_distributed(lambda rank, world_size: rank, 2, timeout_s=10)


def test_taken_master_port_is_retried(monkeypatch, caplog):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real = distributed.find_free_port
        monkeypatch.setattr(distributed, "find_free_port", lambda: next(ports, None) or real())
        results = run_distributed(_sum_of_ranks, 2, 1.0, timeout_s=60)
    assert [r["sum"] for r in results] == [1.0, 1.0]
    assert "retrying on another port" in caplog.text
