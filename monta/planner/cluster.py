"""Cluster spec: nodes, ranks per node, link classes (α-β), NICs, contention and the device.

The YAML shape is the one ``tools/bench_comm.py`` writes, plus optional keys a person adds::

    nodes: 2
    ranks_per_node: 8
    nics_per_node: 4                 # optional, default 1 (see LinkSpec / ClusterSpec.inter_share)
    links:
      intra: {bandwidth_GBps: 200, latency_us: 5}          # + optional per-op fits:
      inter: {bandwidth_GBps: 25, latency_us: 15}          #   ops: {all_gather: {...}, ...}
                                                           # + optional node_bandwidth_GBps
    contention: {inter_under_intra: 1.0, intra_under_inter: 1.0}   # null → 1.0
    device: {peak_tflops: 312, memory_GB: 80, dtype: bf16, ...}    # see DeviceSpec
    launcher: "torchrun --nnodes {nodes} --nproc-per-node {ranks_per_node}"   # optional

GB = 1e9 bytes. Bandwidths are per rank and per direction: bytes one rank sends off-rank divided
by the time (``bench_comm``'s definition). Presets live in ``monta/planner/presets/*.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

PRESET_DIR = Path(__file__).resolve().parent / "presets"
LinkName = Literal["intra", "inter"]
OPS = ("p2p", "all_to_all", "all_gather", "reduce_scatter")
DEFAULT_LAUNCHER = "torchrun --nnodes {nodes} --nproc-per-node {ranks_per_node}"


@dataclass(frozen=True)
class OpFit:
    """One α-β fit: ``t = latency + bytes / bandwidth``."""

    bandwidth_GBps: float
    """Bytes sent off-rank per rank per second, in GB/s (1e9)."""
    latency_us: float = 0.0
    """Fixed cost of one operation (one message step), microseconds."""

    def __post_init__(self):
        if not (self.bandwidth_GBps and self.bandwidth_GBps > 0):
            raise ValueError(f"bandwidth_GBps must be > 0, got {self.bandwidth_GBps!r}")
        if self.latency_us is None or self.latency_us < 0:
            raise ValueError(f"latency_us must be >= 0, got {self.latency_us!r}")


@dataclass(frozen=True)
class LinkSpec:
    """A link class (``intra``: NVLink / loopback; ``inter``: the NICs)."""

    bandwidth_GBps: float
    """Headline bandwidth per rank per direction (bench_comm: the all-to-all fit). For ``inter``
    it is what one rank gets when it is the only one of its node on the network (one NIC)."""
    latency_us: float = 0.0
    """Headline latency per operation step, microseconds."""
    ops: Mapping[str, OpFit] = field(default_factory=dict)
    """Optional per-collective fits (keys from :data:`OPS`), used instead of the headline."""
    node_bandwidth_GBps: float | None = None
    """What ALL ranks of one node together send per direction on this link class while every
    rank of every node uses it at once, as SPMD training does (``tools/bench_comm.py``'s
    contention stage runs each class alone with all groups at once). It differs from the
    per-rank fits where the ranks share something: the node's NICs, or on the one-host testbed
    the host's CPUs that move loopback traffic and per-stream TCP limits. None: the NICs'
    limit, ``bandwidth × nics_per_node`` (inter) or no shared limit (intra)."""

    def __post_init__(self):
        OpFit(self.bandwidth_GBps, self.latency_us)  # validates both
        unknown = set(self.ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)} in link spec; known: {OPS}")
        if self.node_bandwidth_GBps is not None and not self.node_bandwidth_GBps > 0:
            raise ValueError(f"node_bandwidth_GBps must be > 0 or absent, got "
                             f"{self.node_bandwidth_GBps!r}")

    def fit(self, op: str) -> OpFit:
        """The fit for ``op`` (``all_reduce`` uses the reduce-scatter fit), else the headline."""
        op = "reduce_scatter" if op == "all_reduce" else op
        return self.ops.get(op) or OpFit(self.bandwidth_GBps, self.latency_us)


@dataclass(frozen=True)
class Contention:
    """Slowdown of a link class while the other one is busy at the same time (1.0 = none)."""

    inter_under_intra: float = 1.0
    """t(inter-node all-to-all while an intra-node all-gather runs) / t(alone)."""
    intra_under_inter: float = 1.0
    """t(intra-node all-gather while an inter-node all-to-all runs) / t(alone)."""

    def __post_init__(self):
        for name in ("inter_under_intra", "intra_under_inter"):
            value = getattr(self, name)
            if not value >= 1.0 - 1e-9:
                raise ValueError(f"contention.{name} must be >= 1.0 (a slowdown), got {value!r}")


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or CPU rank) and how efficiently the training kernels use it."""

    peak_tflops: float
    """Dense peak of the training dtype, TFLOP/s (no sparsity)."""
    memory_GB: float
    """Device memory per rank, GB (1e9)."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Training precision: bf16 params/activations (fp32 master weights), or plain fp32."""
    gemm_efficiency: float = 0.70
    """Achieved / peak for large dense GEMMs (attention projections, LM head)."""
    grouped_gemm_efficiency: float = 0.65
    """Achieved / peak for the experts' grouped GEMM at large rows per expert."""
    attention_efficiency: float = 0.50
    """Achieved / peak for core attention (flash attention, forward + backward)."""
    gemm_half_rows: int = 64
    """Rows per expert GEMM at which its efficiency halves: eff(n) = eff · n / (n + this)."""
    memory_headroom: float = 0.90
    """Usable share of ``memory_GB`` (allocator fragmentation, NCCL buffers, workspace)."""
    launch_overhead_us: float = 10.0
    """Fixed cost per pipelined stage per chunk (kernel launches, bookkeeping), microseconds."""
    hop_overhead_us: float = 0.0
    """Fixed cost per dispatcher hop (one collective of a MoE block: building its send plan,
    the count exchange's host sync, index copies), once per block whatever the chunk count,
    microseconds. Calibrated on the testbed; 0 where unmeasured (GPU presets: their α's carry
    the count exchange)."""
    flash_attention: bool = True
    """Fused attention (no s² score matrix stored); False on CPU (megatron's unfused path)."""

    def __post_init__(self):
        if not self.peak_tflops > 0 or not self.memory_GB > 0:
            raise ValueError(f"device needs peak_tflops > 0 and memory_GB > 0, got "
                             f"peak_tflops={self.peak_tflops!r} memory_GB={self.memory_GB!r}")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"device.dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.launch_overhead_us < 0 or self.hop_overhead_us < 0:
            raise ValueError(f"device.launch_overhead_us and hop_overhead_us must be >= 0, got "
                             f"{self.launch_overhead_us!r}, {self.hop_overhead_us!r}")
        for name in ("gemm_efficiency", "grouped_gemm_efficiency", "attention_efficiency",
                     "memory_headroom"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"device.{name} must be in (0, 1], got {value!r}")

    @property
    def bytes_per_element(self) -> int:
        return 2 if self.dtype == "bf16" else 4


@dataclass(frozen=True)
class ClusterSpec:
    """The machine the planner plans for."""

    nodes: int
    """Number of nodes."""
    ranks_per_node: int
    """Ranks (GPUs) per node, G."""
    intra: LinkSpec
    """Links between ranks of one node."""
    inter: LinkSpec
    """Links between nodes (per NIC)."""
    device: DeviceSpec
    """Every rank's device."""
    nics_per_node: int = 1
    """NICs per node; a node's inter-node capacity is ``inter.bandwidth_GBps × nics_per_node``,
    shared by the ranks that use it at the same time, each at most one NIC."""
    contention: Contention = Contention()
    """Slowdown factors when inter- and intra-node phases overlap."""
    name: str = "cluster"
    """Label for tables and logs."""
    launcher: str = DEFAULT_LAUNCHER
    """Command prefix for the printed launch line ({nodes}, {ranks_per_node} substituted)."""
    notes: tuple[str, ...] = ()
    """Assumptions the planner should repeat (filled while loading)."""

    def __post_init__(self):
        if self.nodes < 1 or self.ranks_per_node < 1 or self.nics_per_node < 1:
            raise ValueError(f"need nodes, ranks_per_node, nics_per_node >= 1, got nodes="
                             f"{self.nodes} ranks_per_node={self.ranks_per_node} "
                             f"nics_per_node={self.nics_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def link(self, name: LinkName) -> LinkSpec:
        return self.intra if name == "intra" else self.inter

    def inter_share_GBps(self, active_ranks: int) -> float:
        """Headline inter-node bandwidth of one rank while ``active_ranks`` ranks of its node
        send (:meth:`share_GBps` of the headline all-to-all fit)."""
        return self.share_GBps("inter", "all_to_all", active_ranks)

    def share_GBps(self, link: LinkName, op: str, active_ranks: int) -> float:
        """Bandwidth of one rank running ``op`` on ``link`` while ``active_ranks`` ranks of its
        node use that link class: ``min(B_op, B_node / active)``, B_op the op's fit (what a rank
        gets alone), B_node the node's shared capacity — ``node_bandwidth_GBps`` where measured,
        else ``B_op · nics`` for inter (a rank drives one NIC, the node's NICs are shared:
        DESIGN §2) and unlimited for intra."""
        spec = self.link(link)
        own = spec.fit(op).bandwidth_GBps
        node = spec.node_bandwidth_GBps
        if node is None:
            if link == "intra":
                return own
            node = own * self.nics_per_node
        return min(own, node / max(1, active_ranks))

    def with_world(self, world_size: int | None) -> "ClusterSpec":
        """The same machine cut to ``world_size`` ranks (whole nodes, or part of one node)."""
        if world_size is None or world_size == self.world_size:
            return self
        g = self.ranks_per_node
        if world_size < 1:
            raise ValueError(f"--world must be >= 1, got {world_size}")
        if world_size <= g:
            return dataclasses.replace(self, nodes=1, ranks_per_node=world_size)
        if world_size % g:
            raise ValueError(f"--world {world_size} is neither a multiple of ranks_per_node {g} "
                             f"nor at most one node")
        return dataclasses.replace(self, nodes=world_size // g)

    def launch_prefix(self) -> str:
        return self.launcher.format(nodes=self.nodes, ranks_per_node=self.ranks_per_node)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _link(raw: Any, name: str) -> LinkSpec:
    if not isinstance(raw, Mapping):
        raise ValueError(f"links.{name} must be a mapping with bandwidth_GBps and latency_us, "
                         f"got {raw!r}")
    ops = {}
    for op, fit in (raw.get("ops") or {}).items():
        if op in OPS and fit and fit.get("bandwidth_GBps"):
            ops[op] = OpFit(float(fit["bandwidth_GBps"]), float(fit.get("latency_us") or 0.0))
    node = raw.get("node_bandwidth_GBps")
    try:
        return LinkSpec(float(raw["bandwidth_GBps"]), float(raw.get("latency_us") or 0.0), ops,
                        None if node is None else float(node))
    except (KeyError, TypeError) as error:
        raise ValueError(f"links.{name} needs a numeric bandwidth_GBps, got {raw!r}") from error


def cluster_from_dict(raw: Mapping[str, Any], name: str = "cluster",
                      overrides: Mapping[str, Any] | None = None) -> ClusterSpec:
    """Build a :class:`ClusterSpec` from a parsed YAML mapping.

    Args:
        raw: the YAML document (bench_comm's shape, see the module docstring).
        name: label when the document has no ``name``.
        overrides: ``nics_per_node``, ``peak_tflops``, ``memory_GB`` or any other ``device``
            field, applied on top (the CLI's --nics-per-node, --peak-tflops, --memory-gb).
    """
    overrides = dict(overrides or {})
    missing = [key for key in ("nodes", "ranks_per_node", "links") if key not in raw]
    if missing:
        raise ValueError(f"cluster spec {name!r} lacks {missing}; got keys {sorted(raw)}")
    links = raw["links"] or {}
    for link in ("intra", "inter"):
        if link not in links and not (link == "inter" and raw["nodes"] == 1):
            raise ValueError(f"cluster spec {name!r} lacks links.{link}; got {sorted(links)}")
    intra = _link(links["intra"], "intra")
    inter = _link(links["inter"], "inter") if "inter" in links else intra
    notes = []
    device_raw = dict(raw.get("device") or {})
    device_fields = {f.name for f in dataclasses.fields(DeviceSpec)}
    for key in list(overrides):
        if key in device_fields:
            device_raw[key] = overrides.pop(key)
    lacking = [key for key in ("peak_tflops", "memory_GB") if device_raw.get(key) is None]
    if lacking:
        raise ValueError(f"cluster spec {name!r} has no device {lacking}: add "
                         f"device: {{peak_tflops: ..., memory_GB: ...}} to the YAML or pass "
                         f"--peak-tflops / --memory-gb")
    unknown = set(device_raw) - device_fields
    if unknown:
        raise ValueError(f"unknown device keys {sorted(unknown)}; known: {sorted(device_fields)}")
    device = DeviceSpec(**device_raw)
    nics = overrides.pop("nics_per_node", None) or raw.get("nics_per_node")
    if nics is None:
        nics = 1
        if raw["nodes"] > 1:
            notes.append("no nics_per_node in the spec: assuming 1 (the measured inter-node "
                         "bandwidth is shared by all ranks of a node)")
    contention_raw = raw.get("contention") or {}
    contention = Contention(**{k: float(v) for k, v in contention_raw.items()
                               if v is not None and k in ("inter_under_intra",
                                                          "intra_under_inter")})
    if overrides:
        raise ValueError(f"unknown cluster overrides {sorted(overrides)}")
    return ClusterSpec(
        nodes=int(raw["nodes"]), ranks_per_node=int(raw["ranks_per_node"]), intra=intra,
        inter=inter, device=device, nics_per_node=int(nics), contention=contention,
        name=str(raw.get("name") or name), launcher=str(raw.get("launcher") or DEFAULT_LAUNCHER),
        notes=tuple(notes))


def load_cluster(spec: str | Path, overrides: Mapping[str, Any] | None = None) -> ClusterSpec:
    """A cluster spec from a YAML path or a preset name (:func:`list_presets`)."""
    import yaml

    path = Path(spec)
    if not path.is_file():
        preset = PRESET_DIR / f"{spec}.yaml"
        if not preset.is_file():
            raise ValueError(f"cluster spec {str(spec)!r} is neither a file nor a preset; "
                             f"presets: {', '.join(list_presets())}")
        path = preset
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} does not hold a YAML mapping")
    return cluster_from_dict(raw, name=path.stem, overrides=overrides)

