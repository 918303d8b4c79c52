"""Suite-wide rules (tests/README.md):

- Every dependency that scripts/setup.sh installs must import: a missing or broken one stops the
  run with an error instead of turning its tests into skips. INRUN_TEST_ALLOW_MISSING=name,...
  lets a partial environment through on purpose (the affected tests then skip, counted).
- Every skip states its reason (a bare `pytest.skip()` fails), and the summary line counts the
  skips that only a CUDA GPU would run ("gpu-only skipped") apart from the others.
- `triton_launches`: counts real Triton kernel launches by kernel name, for tests that claim the
  Triton path ran (the CPU interpreter here, compiled kernels under benchmarks/gpu_check.sh).
"""
import importlib
import os

# Triton's interpreter must be chosen before any kernel is defined (STYLE.md): set it before the
# package is imported, so the Triton kernels run on CPU tensors in CI.
os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread (also for the subprocesses tests start): the tests' tensors are tiny, and
# OpenMP threads that spin-wait for a core cost 10-100x on a shared or oversubscribed machine
# (measured here: a tiny GPT-2 forward+backward 1 s with 2 threads under load, 5 ms with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# import name -> what scripts/setup.sh installs it as
REQUIRED = {"torch": "torch", "triton": "triton", "transformers": "transformers",
            "accelerate": "accelerate", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
            "numpy": "numpy", "safetensors": "safetensors (with transformers)",
            "pytest_benchmark": "pytest-benchmark", "ninja": "ninja"}

GPU_ONLY = "gpu-only skipped"


def missing_dependencies() -> dict[str, str]:
    """{import name: error} for every REQUIRED module that fails to import."""
    bad = {}
    for mod in REQUIRED:
        try:
            importlib.import_module(mod)
        except Exception as e:   # noqa: BLE001 (a broken install raises more than ImportError)
            bad[mod] = f"{type(e).__name__}: {e}"
    return bad


def pytest_configure(config):
    allowed = {m.strip() for m in os.environ.get("INRUN_TEST_ALLOW_MISSING", "").split(",") if m.strip()}
    bad = {m: e for m, e in missing_dependencies().items() if m not in allowed}
    if bad:
        lines = "\n".join(f"  {m} ({REQUIRED[m]}): {e}" for m, e in bad.items())
        raise pytest.UsageError(
            "dependencies that scripts/setup.sh installs are missing or fail to import:\n" + lines
            + "\nRun `bash scripts/setup.sh`, or set INRUN_TEST_ALLOW_MISSING="
            + ",".join(bad) + " to run without them (their tests are then skipped)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _skip_reason(report) -> str:
    lr = report.longrepr
    return str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr or "")


def _gpu_only(report) -> bool:
    reason = _skip_reason(report)
    return "gpu" in report.keywords or "CUDA" in reason or "GPU" in reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail"):
        reason = _skip_reason(rep).split("Skipped:", 1)[-1].strip()
        if reason in ("", "Skipped", "unconditional skip", "<Skipped instance>"):
            rep.outcome = "failed"
            rep.longrepr = f"{item.nodeid}: skipped without a reason (every skip must say why)"


def pytest_report_teststatus(report, config):
    if report.skipped and not hasattr(report, "wasxfail") and _gpu_only(report):
        return GPU_ONLY, "g", "SKIPPED (GPU only)"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from inrun_kernels.ops import cpp_backend
    state = cpp_backend._state
    if "module" in state:   # where the C++ extension the tests ran came from
        how = (f"built in this run in {cpp_backend.build_seconds:.0f} s" if cpp_backend.build_seconds
               else "loaded from a previous build")
        terminalreporter.write_line(f"C++ extension: {how} ({getattr(state['module'], '__file__', '?')})")
    elif "error" in state:
        terminalreporter.write_line(f"C++ extension: unavailable: {state['error'][:300]}")
    gpu = terminalreporter.stats.get(GPU_ONLY, [])
    if gpu:
        terminalreporter.section(f"{len(gpu)} tests need a CUDA GPU (benchmarks/gpu_check.sh runs them)")
        for rep in gpu:
            terminalreporter.write_line(f"{rep.nodeid}: {_skip_reason(rep).split('Skipped:', 1)[-1].strip()}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def primitives_run(monkeypatch):
    """{reference primitive: calls} through the dispatcher's torch table (which route ran)."""
    from inrun_kernels.ops import dispatch

    calls: dict[str, int] = {}
    table = dispatch._BACKEND_TABLE["torch"][1]
    for name, fn in list(table.items()):
        def counting(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)
        monkeypatch.setitem(table, name, counting)
    return calls


@pytest.fixture
def triton_launches(monkeypatch):
    """{kernel function name: launches} of the Triton kernels while the test runs (every launch
    goes through inrun_kernels.kernels.configs.launch)."""
    from inrun_kernels.kernels import configs

    counts: dict[str, int] = {}
    real = configs.launch

    def counting(kernel, *a, **k):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        counts[name] = counts.get(name, 0) + 1
        return real(kernel, *a, **k)

    monkeypatch.setattr(configs, "launch", counting)
    return counts
