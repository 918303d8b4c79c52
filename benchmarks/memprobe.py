"""Peak memory of ONE method, meant to run in a fresh subprocess (see harness.memory_probe):

    python -m benchmarks.memprobe --config '{"d": 256, "T": 128, "N": 16, "M": 1}' --method plain

Prints one JSON line. CPU: the process's peak RSS (interpreter, torch, transformers, model,
optimizer state and the step's temporaries), and the same minus the RSS just before the first
step. The peak is VmHWM of /proc/self/status, the kernel's RSS high-water mark of THIS process
image; resource.getrusage(RUSAGE_SELF).ru_maxrss is recorded too, but after fork+exec it also
carries the parent's peak at fork time (Linux keeps the max across exec), so with a big parent
it reads high; it is used only where /proc is missing. GPU: torch.cuda.max_memory_allocated over the steps and the
allocation before them.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    return _status_kib("VmRSS") or 0


def peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="StepConfig as JSON")
    ap.add_argument("--method", required=True)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from . import methods as M
    from .common import StepConfig, sync
    cfg = StepConfig.from_dict(json.loads(args.config))
    try:
        m = M.build(args.method, cfg)
    except M.Skip as e:
        print(json.dumps({"skipped": str(e)}))
        return 0
    cuda = cfg.device.startswith("cuda")
    sync(cfg.device)
    before_kib = rss_kib()
    peak_before_kib = peak_kib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        alloc_before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        m.step()
    sync(cfg.device)
    res = {"method": args.method, "steps": args.steps,
           "how": "fresh subprocess, peak RSS (VmHWM = this image's ru_maxrss)",
           "peak_rss_mib": peak_kib() / 1024,
           "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_step_mib": before_kib / 1024,
           "peak_rss_before_step_mib": peak_before_kib / 1024,
           "seconds": time.perf_counter() - t0}
    res["step_rss_mib"] = res["peak_rss_mib"] - res["rss_before_step_mib"]
    if cuda:
        res.update({"how": "fresh subprocess, torch.cuda.max_memory_allocated",
                    "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20,
                    "gpu_before_step_mib": alloc_before / 2 ** 20})
        res["gpu_step_mib"] = res["gpu_peak_mib"] - res["gpu_before_step_mib"]
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
