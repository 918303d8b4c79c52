"""Cost of the validation rows under gradient accumulation (issue 10, item 1).

    python -m benchmarks.accumulation [--k 4] [--M 4] [--rounds 5]

One optimizer step of k micro-batches (GPT-2 L4 d256 T128, N=8 rows each, SGD with momentum,
estimator="first"), timed interleaved in one process, median of `rounds`:
  plain      k plain micro-batch steps (loss.mean()/k backward each), no engine
  joined     the validation rows join every micro-batch's pass (the route before; k x M rows)
  prefetched one validation pass per optimizer step, dense-V dots in each backward (now)
Ratios are to plain."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import inrun_kernels as ik
from benchmarks.common import StepConfig, causal_lm_loss, make_batch, make_model


def _engine_step(cfg, k, route):
    model = make_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    val = make_batch(cfg, cfg.M, seed=999)
    eng = ik.InRunShapley(model, opt, causal_lm_loss, val, accumulation_steps=k, verify=False)
    eng._route = lambda params: route   # force the route being measured
    micro = [make_batch(cfg, cfg.N, seed=j) for j in range(k)]

    def step():
        opt.zero_grad()
        for j, b in enumerate(micro):
            eng.step(b, torch.arange(j * cfg.N, (j + 1) * cfg.N))
        opt.step()
    return step


def _plain_step(cfg, k):
    model = make_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    micro = [make_batch(cfg, cfg.N, seed=j) for j in range(k)]

    def step():
        opt.zero_grad()
        for b in micro:
            (causal_lm_loss(model, b).mean() / k).backward()
        opt.step()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--M", type=int, default=4)
    ap.add_argument("--N", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    cfg = StepConfig(d=256, T=128, N=a.N, M=a.M)
    steps = {"plain": _plain_step(cfg, a.k), "joined": _engine_step(cfg, a.k, "joined"),
             "prefetched": _engine_step(cfg, a.k, "prefetched")}
    times = {n: [] for n in steps}
    for fn in steps.values():   # warm-up
        fn()
    for r in range(a.rounds):
        order = list(steps)[r % 3:] + list(steps)[:r % 3]
        for n in order:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"{cfg.name}, k={a.k} micro-batches of N={a.N}, M={a.M} validation rows, "
          f"{torch.get_num_threads()} threads, median of {a.rounds}")
    for n, t in med.items():
        print(f"  {n:<11} {t * 1e3:8.1f} ms per optimizer step   {t / med['plain']:.2f}x plain")


if __name__ == "__main__":
    main()
