"""pytest-benchmark suite, separate from the unit tests in tests/.

    pytest benchmarks/ --benchmark-only --quick    # smallest config of everything (CI, < 2 min)
    pytest benchmarks/ --benchmark-only            # default subset (< 10 min on 2 cores)
    pytest benchmarks/ --benchmark-only --full     # the issue's whole CPU grid (long)
    ... --benchmark-json=out.json                  # per-method results are in extra_info

Benchmarks only run when benchmarks/ is named on the command line (a bare `pytest` from the repo
root skips them). The Triton interpreter is NOT enabled here (tests/conftest.py enables it for
correctness); on CPU the Triton backend is reported as skipped.
"""
from __future__ import annotations

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    g = parser.getgroup("inrun benchmarks")
    g.addoption("--quick", action="store_true", default=False,
                help="only the smallest config of every benchmark (CI)")
    g.addoption("--full", action="store_true", default=False,
                help="the issue's full CPU grid for step benchmarks (long)")
    g.addoption("--bench-rounds", type=int, default=5, help="timed rounds per step config (>= 5)")
    g.addoption("--cap-s", type=float, default=8.0,
                help="skip vmap / bs-1 loop above this estimated s/step")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: part of the --quick (CI) subset")
    config._inrun_step_results = []


def _named(config) -> bool:
    for a in config.args:
        p = os.path.abspath(a.split("::")[0])
        if p == HERE or p.startswith(HERE + os.sep):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if str(it.fspath).startswith(HERE + os.sep)]
    if not _named(config):
        skip = pytest.mark.skip(reason="benchmarks run only as `pytest benchmarks/ --benchmark-only`")
        for it in mine:
            it.add_marker(skip)
        return
    if config.getoption("--quick"):
        skip = pytest.mark.skip(reason="not in the --quick subset")
        for it in mine:
            if "quick" not in it.keywords:
                it.add_marker(skip)


@pytest.fixture(scope="session")
def slowdown():
    """Estimated slowdown of the capped methods, refined as configs are measured."""
    from .methods import CAPPED
    return dict(CAPPED)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    res = getattr(config, "_inrun_step_results", [])
    if not res:
        return
    tr = terminalreporter
    tr.section("step time ratio to the plain train-only step (p50, interleaved)")
    names = []
    for _, r in res:
        names += [n for n in r if n not in names]
    tr.write_line(f"{'config':<28}" + "".join(f"{n:>15}" for n in names))
    for cfg_name, r in res:
        cells = []
        for n in names:
            t = r.get(n, {})
            cells.append("skipped" if "skipped" in t else f"{t['ratio']:.2f}" if "ratio" in t else "-")
        tr.write_line(f"{cfg_name:<28}" + "".join(f"{c:>15}" for c in cells))
