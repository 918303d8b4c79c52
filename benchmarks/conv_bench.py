"""Native ghost convolutions against the per-sample fallback (issue 14).

    python -m benchmarks.conv_bench [--threads 1] [--rounds 9]

One engine step (eng.step + optimizer.step, SGD, first order with update="sgd") of each CNN with
its Conv1d/Conv2d native and with them sent to the exact per-sample fallback, and a plain
training step of the same model and batch (the baseline), interleaved round-robin in one process;
ratios of medians to the plain step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from inrun_kernels.layers import registry


def digits_cnn():
    """tests/test_digits_cnn.py's model with a parameter-free GroupNorm (no other fallback)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8, affine=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8).eval(),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def small_cnn():
    """3x32x32 inputs, four Conv2d (one depthwise)."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
                         nn.Conv2d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


CASES = {"digits CNN 1x8x8, 64+8 rows": (digits_cnn, (1, 8, 8), 64, 8),
         "small CNN 3x32x32, 32+8 rows": (small_cnn, (3, 32, 32), 32, 8)}


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def steps(build, shape, n, m):
    """{method: one-step callable} for plain, native and fallback (same initial weights)."""
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    val = (torch.randn(m, *shape, generator=g), torch.randint(0, 10, (m,), generator=g))
    out = {}
    torch.manual_seed(0)
    plain = build()
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3)

    def plain_step():
        opt_p.zero_grad()
        ce(plain, train).mean().backward()
        opt_p.step()
    out["plain"] = plain_step
    for mode in ("native", "fallback"):
        # the fallback: patch with the conv rules removed (ik.patch then covers them per sample)
        saved = {t: registry._RULES.pop(t) for t in (nn.Conv1d, nn.Conv2d)} if mode == "fallback" else {}
        try:
            torch.manual_seed(0)
            model = build()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            eng = ik.InRunShapley(model, opt, ce, val, num_samples=n, update="sgd", verify=False)
        finally:
            registry._RULES.update(saved)
        assert bool(ik.coverage(model).fallback) == (mode == "fallback"), ik.coverage(model)

        def step(eng=eng, opt=opt):
            opt.zero_grad()
            eng.step(train, torch.arange(n))
            opt.step()
        out[mode] = step
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conv_bench", description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} interleaved "
          f"rounds, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, (build, shape, n, m) in CASES.items():
        fns = steps(build, shape, n, m)
        times = {k: [] for k in fns}
        for fn in fns.values():   # warm-up (the fallback's first call checks the module)
            fn()
        for _ in range(args.rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name}: plain {med['plain'] * 1e3:.1f} ms; native {med['native'] / med['plain']:.2f}x plain; "
              f"fallback {med['fallback'] / med['plain']:.2f}x plain ({med['fallback'] / med['native']:.1f}x native)")


if __name__ == "__main__":
    main()
