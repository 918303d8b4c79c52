"""Benchmarks of inrun_kernels (separate from the unit tests in tests/).

    pytest benchmarks/ --benchmark-only [--quick | --full]   # pytest-benchmark suite
    python -m benchmarks.run --out benchmarks/results.json   # step-level runner -> JSON
    python -m benchmarks.report                              # JSON -> RESULTS.md + PNGs

See benchmarks/README.md.
"""
