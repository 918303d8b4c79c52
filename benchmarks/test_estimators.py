"""Estimator cost benchmark (issue 8): smoke form for CI. Each estimator method runs on a tiny
GPT-2 and returns finite values; the runner's --estimators mode writes its JSON and the report
renders the "Estimator cost" section from it. No timing is asserted here: the real benchmark is

    python -m benchmarks.run --estimators      # d256 T128 N16 M1 -> benchmarks/results/estimators_cpu.json
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from . import methods as M
from .common import StepConfig

TINY = StepConfig(n_layer=2, d=32, T=16, N=4, M=2, vocab=64, n_head=2)
TINY_ARG = "n_layer=2,d=32,T=16,N=4,M=2,vocab=64,n_head=2"


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waits on
    busy cores (seconds per step instead of milliseconds under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _needs_engine():
    why = M.estimator_support()
    if why:
        pytest.skip(why)


@pytest.mark.quick
@pytest.mark.parametrize("name", list(M.ESTIMATORS))
def test_estimator_method(benchmark, name):
    _needs_engine()
    m = M.build(name, TINY)
    benchmark.group = "estimators: " + TINY.name
    m.step()   # first step: AdamW state is created by it
    benchmark.pedantic(m.step, rounds=2, iterations=1, warmup_rounds=0)
    v = m.values
    assert v is not None and v.shape == (TINY.N,), v
    assert v.dtype == torch.float64
    assert torch.isfinite(v).all(), v
    assert torch.isfinite(m.eng.values).all()
    assert int(m.eng.counts.sum()) >= 2 * TINY.N


@pytest.mark.quick
def test_estimator_runner_and_report(tmp_path):
    _needs_engine()
    from . import report, run
    out = tmp_path / "estimators.json"
    rc = run.main(["--estimators", "--config", TINY_ARG, "--rounds", "5", "--no-memory",
                   "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["meta"]["kind"] == "estimators"
    t = res["configs"][0]["time"]
    for name in M.estimator_method_names():
        assert "ratio" in t[name], (name, t[name])
        assert math.isfinite(t[name]["ratio"]) and t[name]["rounds"] >= 5
    md = tmp_path / "RESULTS.md"
    report.main(["--json", str(out), "--out", str(md)])
    text = md.read_text()
    assert "## Estimator cost" in text and "midpoint / optimizer" in text
