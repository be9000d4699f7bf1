"""MoNTA's strategy planner: cluster spec + model → ranked, costed, explained parallel plans.

Pure Python (no torch, no torch.distributed): it runs and tests anywhere.

    from monta.planner import PlanContext, Workload, load_cluster, load_model, search
    ctx = PlanContext(load_cluster("a800_hdr200"), load_model("paper-2x70b"), Workload(8192))
    best = search(ctx).best          # a frozen Plan: step time, phases, memory, why, flags

Modules: ``cluster`` (spec YAML, presets), ``model`` (HF config / flags), ``routing`` (uniform or
measured histograms → expected copies), ``layout`` (megatron's rank grid, validity), ``volumes``
(bytes per collective), ``compute`` / ``memory`` / ``timing`` (α-β, NIC sharing, contention,
chunked pipelines), ``costmodel`` (one candidate → Plan), ``search``, ``explain``, ``report``,
``auto`` (``pretrain_moe.py --auto-plan``). CLI: ``tools/plan.py``; notes: ``docs/planner.md``.
"""

from monta.planner.cluster import ClusterSpec, DeviceSpec, LinkSpec, load_cluster
from monta.planner.costmodel import PlanContext, evaluate
from monta.planner.model import ModelSpec, Workload, load_model
from monta.planner.plan import Candidate, Plan
from monta.planner.routing import Routing, load_routing
from monta.planner.search import SearchSpace, plan_for, search

__all__ = ["Candidate", "ClusterSpec", "DeviceSpec", "LinkSpec", "ModelSpec", "Plan",
           "PlanContext", "Routing", "SearchSpace", "Workload", "evaluate", "load_cluster",
           "load_model", "load_routing", "plan_for", "search"]
