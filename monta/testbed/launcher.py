"""Run a command as N x G ranks of an emulated multi-node cluster on this host.

    python -m monta.testbed --nodes 2 --ranks-per-node 2 --inter-gbit 1 -- \\
        python -m monta.testbed.probe_worker throughput --out /tmp/tp.json
    python tools/testbed.py --nodes 2 --ranks-per-node 2 --inter-gbit 1 --timeout 600 -- \\
        python pretrain_moe.py ...          # every rank gets torchrun's environment

Two processes, so that nothing outlives the job:

  1) the *outer* launcher (this command) probes once (exit 77 with a one-line reason when user /
     network namespaces or tc are not allowed), then re-runs itself under ``unshare -Urnm`` and
     waits, forwarding Ctrl-C / SIGTERM;
  2) the *inner* launcher, root of fresh user + net + mount namespaces, builds the network
     (:mod:`monta.testbed.netns`), starts every rank with ``ip netns exec`` and supervises them
     (:mod:`monta.testbed.supervisor`), then reads the veths' byte counters. When it exits, the
     namespaces and links vanish with it: no teardown, nothing leaks on failure.

Rank r runs on node ``r // G`` with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK, ROLE_*, GROUP_WORLD_SIZE, MASTER_ADDR = node 0's veth
address, MASTER_PORT), plus GLOO_SOCKET_IFNAME = its node's veth (the host name maps to 127.0.0.1,
so gloo would pick loopback without it), MONTA_RANKS_PER_NODE = G, OMP_NUM_THREADS = 1 and
PYTHONUNBUFFERED = 1 (so output is forwarded line by line) unless already set. Each namespace is a
fresh network stack, so any MASTER_PORT is free.

Exit codes: the first failing rank's code (the others are stopped); 124 on ``--timeout``; 77 when
the testbed is unavailable; 128 + signal when interrupted. ``--link-stats FILE`` writes the veth
counters over the command (see :func:`monta.testbed.netns.link_stats`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from monta.testbed.netns import (
    EXIT_UNAVAILABLE, Layout, link_stats, parse_counters, testbed_available, unshare_prefix,
)
from monta.testbed.supervisor import EXIT_TIMEOUT, Supervisor, say, set_parent_death_signal

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding `monta/`
_SETUP_TIMEOUT_S = 60.0
_BACKSTOP_S = 30.0  # the outer launcher kills the inner one this long after --timeout
_FORWARD_KILL_S = 10.0  # after forwarding a signal, SIGKILL the inner launcher this long later
_NO_PYTHONPATH = "\0unset"  # marks "PYTHONPATH was unset" in the inner launcher's config


@dataclass(frozen=True)
class TestbedResult:
    """What :func:`run_on_testbed` returns.

    Attributes:
        returncode: the launcher's exit code (first failing rank's, 124 timeout, 77 unavailable).
        output: the launcher's stdout and stderr, interleaved; rank lines carry
            ``[rank R node N]``.
        link_bytes: the ``--link-stats`` JSON (per-node veth tx/rx bytes and packets over the
            command); ``None`` when the network was never built.
    """

    __test__ = False  # not a pytest class, whatever its name
    returncode: int
    output: str
    link_bytes: dict[str, Any] | None = None

    @property
    def timed_out(self) -> bool:
        return self.returncode == EXIT_TIMEOUT


def run_on_testbed(command: Sequence[str], nodes: int, ranks_per_node: int, inter_gbit: float,
                   timeout_s: float, env: dict[str, str] | None = None, *,
                   intra_gbit: float | None = None, master_port: int | None = None,
                   cwd: str | os.PathLike | None = None) -> TestbedResult:
    """Run ``command`` as ``nodes * ranks_per_node`` ranks on the testbed and collect the result.

    Args:
        command: argv of every rank.
        env: extra environment for the ranks (on top of this process's).
        timeout_s: the launcher's ``--timeout``; a stuck launcher is killed 60 s later.

    Returns:
        The exit code, output and link counters (see :class:`TestbedResult`).
    """
    with tempfile.TemporaryDirectory(prefix="monta-testbed-") as tmp:
        stats_path = Path(tmp) / "link_stats.json"
        argv = [sys.executable, "-m", "monta.testbed", "--nodes", str(nodes),
                "--ranks-per-node", str(ranks_per_node), "--inter-gbit", str(inter_gbit),
                "--timeout", str(timeout_s), "--link-stats", str(stats_path)]
        if intra_gbit is not None:
            argv += ["--intra-gbit", str(intra_gbit)]
        if master_port is not None:
            argv += ["--master-port", str(master_port)]
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = _with_package_root(full_env.get("PYTHONPATH"))
        proc = subprocess.Popen([*argv, "--", *command], env=full_env, cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s + 60)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            _terminate(proc)
            output, _ = proc.communicate()
            output += f"\nrun_on_testbed: launcher still running {timeout_s + 60:g} s, killed\n"
            returncode = EXIT_TIMEOUT
        except BaseException:  # Ctrl-C / SystemExit in the caller: its own session survives us
            _terminate(proc)
            raise
        link = json.loads(stats_path.read_text()) if stats_path.exists() else None
    return TestbedResult(returncode, output, link)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.inside_config is not None:
        return _inside_main(json.loads(args.inside_config))
    if not args.command:
        say("no command given (usage: python -m monta.testbed [options] -- command ...)")
        return 2
    available, reason = testbed_available()
    if not available:
        say(reason)
        return EXIT_UNAVAILABLE
    return _outside_main(args)


# ---------------------------------------------------------------------------------------------
# Outer launcher


def _outside_main(args: argparse.Namespace) -> int:
    stats_file = tempfile.TemporaryFile()  # anonymous, reached by fd: /run is hidden inside
    config = {"nodes": args.nodes, "ranks_per_node": args.ranks_per_node,
              "inter_gbit": args.inter_gbit, "intra_gbit": args.intra_gbit,
              "master_port": args.master_port, "timeout_s": args.timeout,
              "command": args.command, "stats_fd": stats_file.fileno(), "outer_pid": os.getpid(),
              "pythonpath": os.environ.get("PYTHONPATH", _NO_PYTHONPATH)}
    env = {**os.environ, "PYTHONPATH": _with_package_root(os.environ.get("PYTHONPATH"))}
    inner = subprocess.Popen(
        [*unshare_prefix(), sys.executable, "-m", "monta.testbed", "--inside-config",
         json.dumps(config)],
        env=env, pass_fds=(stats_file.fileno(),), start_new_session=True,
        preexec_fn=set_parent_death_signal,
    )
    forwarded: list[float] = []

    def forward(signum: int, _frame) -> None:  # the inner launcher is in its own session
        forwarded.append(time.monotonic())
        try:
            inner.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout + _BACKSTOP_S
    code = None
    while code is None:
        try:
            code = inner.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            late = deadline is not None and now > deadline
            if late or (forwarded and now - forwarded[0] > _FORWARD_KILL_S):
                say("inner launcher did not stop; killing it" + (" (timeout)" if late else ""))
                inner.kill()
                code = inner.wait()
                code = EXIT_TIMEOUT if late else 128 + signal.SIGINT
    stats_file.seek(0)
    stats = stats_file.read()
    if args.link_stats and stats:
        Path(args.link_stats).write_bytes(stats)
    return 128 - code if code < 0 else code


def _with_package_root(pythonpath: str | None) -> str:
    """``pythonpath`` with the directory holding ``monta/`` first (for ``-m monta.testbed``)."""
    return _PACKAGE_ROOT + (os.pathsep + pythonpath if pythonpath else "")


def _terminate(proc: subprocess.Popen) -> None:
    proc.terminate()  # the launcher stops its ranks on SIGTERM
    try:
        proc.wait(timeout=_FORWARD_KILL_S + 5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Inner launcher (inside the namespaces)


def _inside_main(config: dict[str, Any]) -> int:
    # Die with the outer launcher, even if it is SIGKILLed (the ranks then die with us).
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != config["outer_pid"]:
        say("the launcher that started this one is gone; not starting")
        return 1
    layout = Layout(config["nodes"], config["inter_gbit"], config["intra_gbit"])
    try:
        setup = subprocess.run(["bash", "-c", layout.setup_script()], capture_output=True,
                               text=True, timeout=_SETUP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        say(f"network setup took over {_SETUP_TIMEOUT_S:g} s")
        return EXIT_UNAVAILABLE
    if setup.returncode != 0:
        lines = [ln for ln in setup.stderr.splitlines() if ln.strip()] or ["(no output)"]
        say(f"network setup failed: {lines[-1].strip()}")
        return EXIT_UNAVAILABLE
    g = config["ranks_per_node"]
    node_of_rank = [r // g for r in range(layout.nodes * g)]
    intra = "uncapped" if layout.intra_gbit is None else f"{layout.intra_gbit:g} Gbit/s"
    say(f"{layout.nodes} node(s) x {g} rank(s); inter-node {layout.inter_gbit:g} Gbit/s per "
        f"direction (tbf on both ends of each veth{', bridge' if layout.bridged else ''}); "
        f"intra-node {intra}; MASTER_ADDR={layout.addr(0)} MASTER_PORT={config['master_port']}")
    before = _read_counters(layout)
    placements = [(layout.netns(node), _rank_env(config, layout, rank, node))
                  for rank, node in enumerate(node_of_rank)]
    code = Supervisor(config["command"], placements, node_of_rank).run(config["timeout_s"])
    stats = link_stats(layout, before, _read_counters(layout))
    os.write(config["stats_fd"], json.dumps(stats, indent=1).encode())
    return code


def _rank_env(config: dict[str, Any], layout: Layout, rank: int, node: int) -> dict[str, str]:
    g = config["ranks_per_node"]
    env = dict(os.environ)
    if config["pythonpath"] == _NO_PYTHONPATH:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = config["pythonpath"]
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank % g), "WORLD_SIZE": str(layout.nodes * g),
        "LOCAL_WORLD_SIZE": str(g), "GROUP_RANK": str(node), "NODE_RANK": str(node),
        "GROUP_WORLD_SIZE": str(layout.nodes), "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(layout.nodes * g), "ROLE_NAME": "default",
        "TORCHELASTIC_RUN_ID": "monta-testbed", "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "MASTER_ADDR": layout.addr(0), "MASTER_PORT": str(config["master_port"]),
        "GLOO_SOCKET_IFNAME": layout.dev(node), "MONTA_RANKS_PER_NODE": str(g),
        "OMP_NUM_THREADS": "1",
    })
    return env


def _read_counters(layout: Layout) -> dict:
    proc = subprocess.run(["bash", "-c", layout.counters_script()], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    return parse_counters(proc.stdout)


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m monta.testbed",
        description="Run COMMAND as nodes x ranks-per-node ranks in network namespaces joined "
                    "by rate-capped links, with torchrun's environment.",
        epilog="Exit codes: the first failing rank's; 124 timeout; 77 testbed unavailable.",
        usage="%(prog)s --nodes N --ranks-per-node G --inter-gbit R [options] -- COMMAND ...")
    parser.add_argument("--nodes", type=int, help="node namespaces (required)")
    parser.add_argument("--ranks-per-node", type=int,
                        help="ranks per node; rank r runs on node r // G (required)")
    parser.add_argument("--inter-gbit", type=float,
                        help="inter-node cap per direction, Gbit/s (required)")
    parser.add_argument("--intra-gbit", type=float, default=None,
                        help="cap on each node's loopback, shared by its ranks (default none)")
    parser.add_argument("--master-port", type=int, default=29500,
                        help="MASTER_PORT (default 29500; every run has a fresh network stack)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop every rank after this many seconds and exit 124")
    parser.add_argument("--link-stats", metavar="FILE", default=None,
                        help="write the veths' byte counters over the command here (JSON)")
    parser.add_argument("--inside-config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = command
    if args.inside_config is None:
        missing = [flag for flag in ("nodes", "ranks_per_node", "inter_gbit")
                   if getattr(args, flag) is None]
        if missing:
            parser.error("missing " + ", ".join("--" + f.replace("_", "-") for f in missing))
        if args.nodes < 1 or args.ranks_per_node < 1:
            parser.error(f"--nodes and --ranks-per-node must be >= 1, got --nodes {args.nodes} "
                         f"--ranks-per-node {args.ranks_per_node}")
        try:
            Layout(args.nodes, args.inter_gbit, args.intra_gbit)
        except ValueError as err:
            parser.error(str(err))
        if args.timeout is not None and args.timeout <= 0:
            parser.error(f"--timeout must be > 0 seconds, got --timeout {args.timeout}")
    return args
