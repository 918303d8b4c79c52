"""Kernel-level benchmarks: each ghost primitive per backend (through ops' dispatcher) against
the reference function (inrun_kernels.ops.reference) called directly, across T, d, p, M."""
from __future__ import annotations

import pytest

from .kernels import PRIMITIVES, backend_skip, kernel_shapes, make_case

IMPLS = ["reference", "torch", "triton", "cpp"]


def _params():
    quick = kernel_shapes(quick=True)
    shapes = quick + [s for s in kernel_shapes() if s not in quick]
    for s in shapes:
        for prim in PRIMITIVES:
            for impl in IMPLS:
                marks = [pytest.mark.quick] if s in quick else []
                yield pytest.param(prim, impl, s, id=f"{prim}-{impl}-{s.name}", marks=marks)


@pytest.mark.parametrize("prim,impl,shape", list(_params()))
def test_kernel(benchmark, prim, impl, shape):
    why = backend_skip(impl, "cpu")
    if why:
        pytest.skip(why)
    fn = make_case(prim, impl, shape)
    benchmark.group = f"{prim} {shape.name}"
    benchmark.extra_info.update({"primitive": prim, "impl": impl, "shape": shape.__dict__})
    out = benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=2)
    assert out.isfinite().all()
