"""bench/gpu_front_latency.py's host timeline (the GPU timing runs on the device only)."""

from __future__ import annotations

import types

from bench import gpu_front_latency


class _Layer:
    def route(self, x):
        return x + 1

    def experts(self, x):
        return self.route(x) * 2


def test_host_timeline_orders_the_steps_and_restores_every_method():
    """Entries and exits come back in the order the pass reached them, first time per pass;
    a method not reached is absent; instance, class and module attributes are all put back."""
    layer = _Layer()
    module = types.ModuleType("fake")
    module.helper = lambda x: x - 1
    never = _Layer()
    hooks = {"experts": (layer, "experts"), "route": (layer, "route"),
             "helper": (module, "helper"), "class route": (_Layer, "route"),
             "never": (never, "experts")}
    befores = []
    timeline = gpu_front_latency.host_timeline(
        lambda: module.helper(layer.experts(3)) + _Layer().route(0), hooks, passes=3,
        before=lambda: befores.append(1))
    assert list(timeline) == ["experts >", "route >", "route <", "experts <", "helper >",
                              "helper <", "class route >", "class route <", "step returned"]
    assert all(us >= 0 for us in timeline.values()) and len(befores) == 3
    assert "experts" not in vars(layer) and "route" not in vars(layer)
    assert _Layer.route.__name__ == "route" and module.helper(1) == 0
    assert layer.experts(3) == 8
