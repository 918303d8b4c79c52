"""Peak memory per method: a fresh subprocess per method (CPU: peak RSS; GPU:
torch.cuda.max_memory_allocated). pytest-benchmark times the subprocess; the memory figures are
in extra_info."""
from __future__ import annotations

import pytest

from . import harness as H
from . import methods as M
from .common import QUICK_CONFIG, TARGET_CONFIGS

CFGS = [QUICK_CONFIG, TARGET_CONFIGS[1]]
NAMES = ["plain", "plain_concat", "inrun[torch]", "authors"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cfg", [pytest.param(c, id=c.name, marks=[pytest.mark.quick] if c == QUICK_CONFIG else [])
                                 for c in CFGS])
def test_memory(benchmark, cfg, name):
    benchmark.group = "memory: " + cfg.name
    res = benchmark.pedantic(H.memory_probe, args=(cfg, name), kwargs={"steps": 1}, rounds=1, iterations=1)
    benchmark.extra_info.update({"config": cfg.to_dict(), "method": name, **res})
    if "skipped" in res:
        pytest.skip(res["skipped"])
    assert "error" not in res, res.get("error")
