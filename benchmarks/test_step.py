"""Step-level benchmarks: every method of a config timed in one process, interleaved.

pytest-benchmark times one ROUND (every method once, order rotated per round); the per-method
p20/p50/p80, ratios to the plain train-only step and skip reasons are in extra_info (see
--benchmark-json) and in the summary printed at the end.
"""
from __future__ import annotations

import pytest

from . import harness as H
from . import methods as M
from .common import QUICK_CONFIG, TARGET_CONFIGS, StepConfig, cpu_configs

DEFAULT = [QUICK_CONFIG, *TARGET_CONFIGS, StepConfig(d=256, T=256, N=16, M=4),
           StepConfig(d=512, T=128, N=8, M=1)]


def pytest_generate_tests(metafunc):
    if "cfg" in metafunc.fixturenames:
        full = metafunc.config.getoption("--full")
        cfgs = cpu_configs() if full else DEFAULT
        params = [pytest.param(c, id=c.name, marks=[pytest.mark.quick] if c == QUICK_CONFIG else [])
                  for c in cfgs]
        metafunc.parametrize("cfg", params)


def test_step(benchmark, cfg, slowdown, request):
    rounds = max(5, request.config.getoption("--bench-rounds"))
    il = H.Interleaved(cfg, M.method_names(), cap_s=request.config.getoption("--cap-s"),
                       slowdown=slowdown, log=lambda *a: None).setup()
    benchmark.group = "step: " + cfg.name
    benchmark.name = "round of " + ",".join(il.order)
    benchmark.pedantic(il.round, rounds=rounds, iterations=1, warmup_rounds=0)
    while len(il.times["plain"]) < rounds:   # --benchmark-disable runs the round only once
        il.round()
    res = il.results()
    il.close()
    benchmark.extra_info.update({"config": cfg.to_dict(), "methods": res})
    request.config._inrun_step_results.append((cfg.name, res))
    assert res["plain"]["rounds"] >= 5
