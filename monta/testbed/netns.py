"""The emulated cluster's network: one network namespace per node, joined by rate-capped links.

Layout (``N`` nodes, addresses ``10.77.0.{i+1}/24`` on the node side only)::

    N == 2:  n0:v0 <==veth==> n1:v1                   tbf on v0 and v1
    N != 2:  ni:vi <==veth==> sw:si -- br0 (bridge)   tbf on vi (node side) and si (switch port)

tbf shapes egress only, so both ends of every veth are capped: a node's sends leave through its
``vi``, and with a bridge its receives leave the switch through ``si``. Ranks of one node talk over
that namespace's ``lo`` (uncapped unless ``intra_gbit`` puts a tbf on it as well), so intra-node
traffic never touches a veth. ``netem`` is absent from this kernel: bandwidth can be capped,
latency cannot be added.

Everything here runs inside ``unshare -Urnm`` (user + net + mount namespaces, a tmpfs on /run for
``ip netns``), so the namespaces vanish with the last process inside them, even after a crash.
This module only builds shell text, probes, and parses counters; :mod:`monta.testbed.launcher`
runs them.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "10.77.0"  # /24; only addresses assigned inside our own namespaces are ever used
SWITCH_NS = "sw"
BRIDGE = "br0"
EXIT_UNAVAILABLE = 77  # "emulation unavailable": the launcher's exit code, tests skip on it
_MIN_BURST_BYTES = 256 * 1024  # > 64 KiB GSO packets (and lo's 64 KiB MTU), so tbf never splits
_TBF_LATENCY = "50ms"  # queue limit = rate * latency + burst
_STAT_FIELDS = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")
_REQUIRED_TOOLS = ("unshare", "ip", "tc", "bash", "mount")
_PROBE_TIMEOUT_S = 20.0
# Runs a command; on failure prints "<command>: <its output>" as one line and exits 77.
_RUN_FN = ('run() { local out; out=$("$@" 2>&1) || '
           '{ printf "%s: %s\\n" "$*" "$(echo "$out" | tr "\\n" " ")" >&2; exit 77; }; }')


@dataclass(frozen=True)
class Layout:
    """Names and addresses of the emulated cluster.

    Attributes:
        nodes: number of node namespaces (1..250).
        inter_gbit: tbf rate on every veth end, Gbit/s.
        intra_gbit: tbf rate on each node's ``lo`` (all intra-node traffic of that node shares
            it), Gbit/s; ``None`` leaves loopback uncapped.
    """

    nodes: int
    inter_gbit: float
    intra_gbit: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 250:
            raise ValueError(f"nodes must be in 1..250 (one /24), got nodes={self.nodes}")
        for name in ("inter_gbit", "intra_gbit"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 Gbit/s, got {name}={value}")

    @property
    def bridged(self) -> bool:
        return self.nodes != 2

    def netns(self, node: int) -> str:
        return f"n{node}"

    def dev(self, node: int) -> str:
        """The node's veth (its ``GLOO_SOCKET_IFNAME``); names stay <= 15 characters."""
        return f"v{node}"

    def port(self, node: int) -> str:
        """The switch-side end of the node's veth (bridged layouts only)."""
        return f"s{node}"

    def addr(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def setup_script(self) -> str:
        """Bash that builds the namespaces and links (run inside ``unshare -Urnm``); exits 77
        with a one-line reason on stderr at the first command that fails."""
        lines = [_RUN_FN,
                 "run mount -t tmpfs -o mode=0755 none /run", "run mkdir -p /run/netns"]
        # Names for our addresses (bind-mounted over /etc/hosts in this mount namespace only), so
        # c10d's reverse lookups answer at once instead of failing without DNS.
        hosts = "".join(f"{a}{self.addr(i)} monta-node{i}\\n" for i in range(self.nodes)
                        for a in ("", "::ffff:"))  # c10d looks up v4-mapped forms too
        lines += ["mkdir -p /run/monta-testbed",
                  f"{{ cat /etc/hosts; printf '{hosts}'; }} > /run/monta-testbed/hosts",
                  "mount --bind /run/monta-testbed/hosts /etc/hosts 2>/dev/null || true"]
        namespaces = [self.netns(i) for i in range(self.nodes)]
        if self.bridged:
            namespaces.append(SWITCH_NS)
        for ns in namespaces:
            lines += [f"run ip netns add {ns}",
                      # No IPv6: no router solicitations or DAD packets on the counted veths, and
                      # gloo cannot pick a link-local address.
                      f"ip netns exec {ns} sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/"
                      "disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6' "
                      "2>/dev/null || true",
                      f"run ip -n {ns} link set lo up"]
        if self.bridged:
            lines += [f"run ip -n {SWITCH_NS} link add {BRIDGE} type bridge",
                      f"run ip -n {SWITCH_NS} link set {BRIDGE} up"]
            for i in range(self.nodes):
                lines += [
                    f"run ip link add {self.dev(i)} netns {self.netns(i)} type veth "
                    f"peer name {self.port(i)} netns {SWITCH_NS}",
                    f"run ip -n {SWITCH_NS} link set {self.port(i)} master {BRIDGE}",
                    f"run ip -n {SWITCH_NS} link set {self.port(i)} up",
                    self._tbf(SWITCH_NS, self.port(i), self.inter_gbit),
                ]
        else:
            lines.append(f"run ip link add {self.dev(0)} netns {self.netns(0)} type veth "
                         f"peer name {self.dev(1)} netns {self.netns(1)}")
        for i in range(self.nodes):
            ns, dev = self.netns(i), self.dev(i)
            lines += [f"run ip -n {ns} addr add {self.addr(i)}/24 dev {dev}",
                      f"run ip -n {ns} link set {dev} up",
                      self._tbf(ns, dev, self.inter_gbit)]
            if self.intra_gbit is not None:
                lines.append(self._tbf(ns, "lo", self.intra_gbit))
        return "\n".join(lines) + "\n"

    def counters_script(self) -> str:
        """Bash printing ``<kind> <node> <field> <value>`` for every counted device."""
        by_ns: dict[str, list[str]] = {}
        devices = [("node", i, self.netns(i), self.dev(i)) for i in range(self.nodes)]
        if self.bridged:
            devices += [("port", i, SWITCH_NS, self.port(i)) for i in range(self.nodes)]
        for kind, node, ns, dev in devices:
            by_ns.setdefault(ns, []).extend(
                f'echo "{kind} {node} {field} $(cat /sys/class/net/{dev}/statistics/{field})"'
                for field in _STAT_FIELDS)
        # One `ip netns exec` per namespace: it remounts /sys so that namespace's devices show.
        return "".join(f"ip netns exec {ns} sh -c {shlex.quote('; '.join(cmds))}\n"
                       for ns, cmds in by_ns.items())

    def _tbf(self, ns: str, dev: str, gbit: float) -> str:
        rate_bits = int(gbit * 1e9)
        burst = max(_MIN_BURST_BYTES, rate_bits // 8 // 1000)  # >= 1 ms at full rate
        return (f"run tc -n {ns} qdisc replace dev {dev} root tbf rate {rate_bits}bit "
                f"burst {burst} latency {_TBF_LATENCY}")


def parse_counters(text: str) -> dict[tuple[str, int], dict[str, int]]:
    """``counters_script`` output -> ``{(kind, node): {field: value}}``."""
    out: dict[tuple[str, int], dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in _STAT_FIELDS and parts[3].isdigit():
            out.setdefault((parts[0], int(parts[1])), {})[parts[2]] = int(parts[3])
    return out


def link_stats(layout: Layout, before: dict, after: dict) -> dict:
    """Counter deltas over the command, as the JSON the launcher reports.

    ``links[i]`` is node i's veth: ``tx_bytes`` is what node i sent to other nodes, headers
    included (Ethernet + IP + TCP, one set per GSO packet, plus ACKs and connection set-up).
    """
    def delta(kind: str, node: int, dev: str) -> dict:
        a, b = after.get((kind, node), {}), before.get((kind, node), {})
        return {"node": node, "dev": dev,
                **{f: a.get(f, 0) - b.get(f, 0) for f in _STAT_FIELDS}}

    links = [dict(delta("node", i, layout.dev(i)), netns=layout.netns(i))
             for i in range(layout.nodes)]
    stats = {"nodes": layout.nodes, "inter_gbit": layout.inter_gbit,
             "intra_gbit": layout.intra_gbit, "links": links,
             "total_tx_bytes": sum(link["tx_bytes"] for link in links),
             "total_rx_bytes": sum(link["rx_bytes"] for link in links)}
    if layout.bridged:
        stats["switch_ports"] = [delta("port", i, layout.port(i)) for i in range(layout.nodes)]
    return stats


def unshare_prefix() -> list[str]:
    """Run the rest of the command line as root of fresh user + net + mount namespaces."""
    return ["unshare", "-Urnm", "--propagation", "private"]


def missing_tools() -> list[str]:
    return [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]


@functools.cache
def testbed_available() -> tuple[bool, str]:
    """Whether this host can build the testbed: ``(True, "")`` or ``(False, reason)``.

    Builds a 2-node, 1 Gbit/s layout inside ``unshare -Urnm`` and throws it away (~50 ms).
    Cached per process.
    """
    missing = missing_tools()
    if missing:
        return False, f"testbed unavailable: {', '.join(missing)} not found on PATH"
    try:
        proc = subprocess.run([*unshare_prefix(), "bash", "-c", Layout(2, 1.0).setup_script()],
                              capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"testbed unavailable: namespace probe took over {_PROBE_TIMEOUT_S:.0f} s"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        return False, f"testbed unavailable (network namespaces or tc not allowed): {why}"
    return True, ""
