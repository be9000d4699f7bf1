"""The planner's output: a candidate strategy and the frozen, explained, costed :class:`Plan`."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Literal

from monta.planner.memory import MemoryEstimate
from monta.planner.recompute import parse_recompute, recompute_of_args, recompute_settings
from monta.planner.volumes import Mode

Dispatcher = Literal["alltoall", "ds_tp", "monta"]
PHASES = ("compute/attention", "compute/experts", "compute/lm_head", "tp/collectives",
          "ep/inter", "ep/intra", "ep/overhead", "pp/p2p", "pp/bubble", "dp/grad_sync")


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    tp: int
    """--tensor-model-parallel-size (sequence parallel when > 1)."""
    pp: int
    """--pipeline-model-parallel-size."""
    ep: int
    """--expert-model-parallel-size."""
    etp: int
    """--expert-tensor-parallel-size."""
    dispatcher: Dispatcher = "monta"
    """--moe-token-dispatcher-type."""
    node_dedup: bool = False
    """--monta-node-dedup on (monta only)."""
    chunks: int = 1
    """--monta-chunks (monta only)."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``full`` or ``selective:<modules>``
    (:mod:`monta.planner.recompute`)."""

    def __post_init__(self):
        if self.dispatcher not in ("alltoall", "ds_tp", "monta"):
            raise ValueError(f"dispatcher must be alltoall, ds_tp or monta, got "
                             f"{self.dispatcher!r}")
        if self.dispatcher != "monta" and (self.node_dedup or self.chunks != 1):
            raise ValueError(f"node_dedup / chunks apply to the monta dispatcher only, got "
                             f"dispatcher={self.dispatcher} node_dedup={self.node_dedup} "
                             f"chunks={self.chunks}")
        if self.chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {self.chunks}")
        parse_recompute(self.recompute)

    @property
    def recompute_granularity(self) -> str:
        """``none``, ``full`` or ``selective``."""
        return parse_recompute(self.recompute)[0]

    @property
    def recompute_modules(self) -> tuple[str, ...]:
        """The selectively recomputed modules (empty unless selective)."""
        return parse_recompute(self.recompute)[1]

    @property
    def mode(self) -> Mode:
        if self.dispatcher == "monta":
            return "monta_dedup" if self.node_dedup else "monta_flat"
        return self.dispatcher

    @property
    def dispatch_label(self) -> str:
        if self.dispatcher != "monta":
            return self.dispatcher
        dedup = "+dedup" if self.node_dedup else ""
        return f"monta{dedup}{f' c{self.chunks}' if self.chunks > 1 else ''}"

    @property
    def layout_label(self) -> str:
        return f"TP{self.tp}·PP{self.pp}·EP{self.ep}·ETP{self.etp}"

    def __str__(self) -> str:
        recompute = {"none": "", "full": " recompute"}.get(
            self.recompute, f" recompute {'+'.join(self.recompute_modules)}")
        return f"{self.layout_label} {self.dispatch_label}{recompute}"


@dataclass(frozen=True)
class PhaseCost:
    """One phase's share of a step, per rank."""

    name: str
    """One of :data:`PHASES`."""
    seconds: float
    """Time on the critical path (the phases sum to the step time)."""
    raw_seconds: float
    """Time the phase takes on its own (overlap and pipelining ignored)."""
    intra_bytes: float = 0.0
    """Bytes this rank sends over intra-node links per step."""
    inter_bytes: float = 0.0
    """Bytes this rank sends over inter-node links per step."""
    resource: Literal["compute", "intra", "inter", "idle"] = "compute"
    """What the phase keeps busy (a phase using both link classes names the slower)."""


@dataclass(frozen=True)
class Plan:
    """A costed strategy; frozen, logged once."""

    candidate: Candidate
    world_size: int
    nodes: int
    ranks_per_node: int
    dp: int
    """Data parallel (world / (TP · PP))."""
    edp: int
    """Expert data parallel (world / (ETP · EP · PP))."""
    micro_batches: int
    """Per step per DP rank."""
    tokens_per_step: int
    step_time_s: float
    phases: tuple[PhaseCost, ...]
    memory: MemoryEstimate
    flags: tuple[str, ...] = ()
    """pretrain_moe.py flags that run this plan."""
    launch: str = ""
    """Launcher prefix (torchrun / monta.testbed)."""
    why: tuple[str, ...] = ()
    """Plain-language reasons, filled by :func:`monta.planner.explain.explain`."""
    notes: tuple[str, ...] = ()
    """Assumptions behind the numbers."""

    def phase(self, name: str) -> PhaseCost:
        for p in self.phases:
            if p.name == name:
                return p
        return PhaseCost(name, 0.0, 0.0)

    def seconds(self) -> dict[str, float]:
        return {p.name: p.seconds for p in self.phases}

    def link_bytes(self) -> dict[str, float]:
        return {"intra": sum(p.intra_bytes for p in self.phases),
                "inter": sum(p.inter_bytes for p in self.phases)}

    def link_seconds(self) -> dict[str, float]:
        """Raw busy time per link class and compute, per step (no overlap)."""
        out = {"compute": 0.0, "intra": 0.0, "inter": 0.0}
        for p in self.phases:
            if p.resource in out:
                out[p.resource] += p.raw_seconds
        return out

    def ep_comm_seconds(self) -> float:
        """Dispatch + combine communication on the critical path (the paper's "AllToAll")."""
        return sum(self.phase(n).seconds for n in ("ep/inter", "ep/intra", "ep/overhead"))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_time_s

    def command(self) -> str:
        return f"{self.launch} pretrain_moe.py {shlex.join(self.flags)}".strip()

    def with_why(self, why: tuple[str, ...]) -> "Plan":
        return dataclasses.replace(self, why=tuple(why))

    def to_dict(self) -> dict:
        c = self.candidate
        return {
            "candidate": dataclasses.asdict(c), "label": str(c), "dp": self.dp, "edp": self.edp,
            "world_size": self.world_size, "nodes": self.nodes,
            "ranks_per_node": self.ranks_per_node, "micro_batches": self.micro_batches,
            "tokens_per_step": self.tokens_per_step, "step_time_s": self.step_time_s,
            "tokens_per_second": self.tokens_per_second,
            "phases": [dataclasses.asdict(p) for p in self.phases],
            "link_bytes": self.link_bytes(), "link_seconds": self.link_seconds(),
            "ep_comm_seconds": self.ep_comm_seconds(),
            "memory_GB": dataclasses.asdict(self.memory) | {"total_GB": self.memory.total_GB,
                                                            "fits": self.memory.fits},
            "flags": list(self.flags), "command": self.command(), "why": list(self.why),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """One log line."""
        return (f"plan {self.candidate} (DP{self.dp}, {self.micro_batches} micro-batch"
                f"{'es' if self.micro_batches != 1 else ''}): "
                f"{self.step_time_s * 1e3:.1f} ms/step, {self.memory.total_GB:.1f} GB/rank; "
                + "; ".join(self.why))


def candidate_flags(candidate: Candidate, dp: int, edp: int, ranks_per_node: int,
                    bf16: bool, distributed_optimizer: bool = True) -> list[str]:
    """The parallel/dispatcher flags of ``candidate`` (pretrain_moe.py names)."""
    c = candidate
    out = ["--tensor-model-parallel-size", str(c.tp)]
    if c.tp > 1:
        out.append("--sequence-parallel")
    out += ["--pipeline-model-parallel-size", str(c.pp),
            "--expert-model-parallel-size", str(c.ep),
            "--expert-tensor-parallel-size", str(c.etp),
            "--moe-token-dispatcher-type", c.dispatcher]
    if c.dispatcher == "monta":
        out += ["--monta-node-dedup", "on" if c.node_dedup else "off",
                "--monta-chunks", str(c.chunks)]
    for name, value in recompute_settings(c.recompute).items():
        values = value if isinstance(value, list) else [value]
        out += [f"--{name.replace('_', '-')}", *map(str, values)]
    if distributed_optimizer and (dp > 1 or edp > 1):
        out.append("--use-distributed-optimizer")
    out += ["--ranks-per-node", str(ranks_per_node)]
    if bf16:
        out.append("--bf16")
    return out


def candidate_from_args(args) -> Candidate:
    """The candidate that parsed ``pretrain_moe.py`` flags run (the inverse of
    :func:`candidate_flags`), so a measured run and its prediction share one set of flags.

    Raises:
        ValueError: ``--monta-node-dedup auto|tune`` or ``--monta-chunks tune`` (decided at
            run time, so no single candidate).
    """
    dispatcher = args.moe_token_dispatcher_type
    node_dedup, chunks = False, 1
    if dispatcher == "monta":
        dedup, chunks = getattr(args, "monta_node_dedup", "off"), getattr(args, "monta_chunks", 1)
        if dedup not in ("on", "off") or not isinstance(chunks, int):
            raise ValueError(f"--monta-node-dedup {dedup} --monta-chunks {chunks}: the planner "
                             f"costs fixed choices only (on/off and a number of chunks)")
        node_dedup = dedup == "on"
    return Candidate(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                     args.expert_model_parallel_size, args.expert_tensor_parallel_size,
                     dispatcher, node_dedup, chunks, recompute_of_args(args))
