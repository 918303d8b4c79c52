"""torch.compile: the engine step vs the plain training step, eager and compiled, side by side.

    python -m benchmarks.compile_bench                       # GPT-2 L2 d128 T64 N8 M1, vocab 4096
    python -m benchmarks.compile_bench --optimizer adamw     # AdamW: the kept-reps route
    python -m benchmarks.compile_bench --config d=256,T=128,N=16 --rounds 9

Four variants in one process, same weights and data, timed in interleaved rounds (one step of
each per round, so a load change on a shared machine hits all of them), median per variant:

    eager plain      loss_fn(model, train).mean().backward(); optimizer.step()
    eager engine     InRunShapley(model, ...).step(train, ids); optimizer.step()
    compiled plain   the same with torch.compile(model) (Inductor, default options)
    compiled engine  InRunShapley(torch.compile(model), ...)

Each variant has its own copy of the model and optimizer. Compilation (first call of each
compiled variant) and a few warm-up steps are not timed; their wall time is printed.
The engine runs estimator="first", verify=False (a one-off check); with SGD (default) the
validation rows join the batch and the values come out of the one backward; with AdamW the
training rows' reps are kept and dotted with the optimizer-aware vector after it (a validation
forward+backward on the eager model).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from .common import StepConfig, causal_lm_loss, env_info, hardware_line, make_data, make_model, quantile

DEFAULT = StepConfig(n_layer=2, d=128, T=64, N=8, M=1, vocab=4096, n_head=4)


def _parse(text: str, base: StepConfig) -> StepConfig:
    d = base.to_dict()
    for item in filter(None, text.split(",")):
        k, v = item.split("=", 1)
        d[{"layers": "n_layer"}.get(k, k)] = type(d[{"layers": "n_layer"}.get(k, k)])(v)
    return StepConfig.from_dict(d)


def _optimizer(name: str, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def build_variants(cfg: StepConfig, opt_name: str):
    import inrun_kernels as ik
    base = make_model(cfg)
    train, val = make_data(cfg)
    ids = torch.arange(cfg.N)
    steps = {}

    def plain(model, fwd):
        opt = _optimizer(opt_name, model)

        def step():
            opt.zero_grad(set_to_none=True)
            causal_lm_loss(fwd, train).mean().backward()
            opt.step()
        return step

    def engine(model, fwd):
        opt = _optimizer(opt_name, model)
        eng = ik.InRunShapley(fwd, opt, causal_lm_loss, val, num_samples=cfg.N, verify=False)

        def step():
            opt.zero_grad(set_to_none=True)
            eng.step(train, ids)
            opt.step()
        return step

    for name, make, compiled in (("eager plain", plain, False), ("eager engine", engine, False),
                                 ("compiled plain", plain, True), ("compiled engine", engine, True)):
        model = copy.deepcopy(base)
        fwd = torch.compile(model) if compiled else model
        steps[name] = make(model, fwd)
    return steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="", help="e.g. d=256,T=128,N=16,M=1,layers=2,vocab=4096")
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _parse(args.config, DEFAULT)
    env = env_info()
    print(f"# {hardware_line(env)}")
    print(f"# load average at start: {env['hardware']['loadavg_at_start']}")
    print(f"# GPT-2 {cfg.name}, float32, optimizer {args.optimizer}, engine estimator 'first', "
          f"{args.warmup} warm-up steps, median of {args.rounds} interleaved rounds")
    steps = build_variants(cfg, args.optimizer)
    for name, step in steps.items():   # compile + warm-up, untimed
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        for _ in range(args.warmup):
            step()
        print(f"# {name:<16} first step (incl. compilation) {first:7.2f} s")
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {name: quantile(ts, 0.5) for name, ts in times.items()}
    print(f"{'variant':<16} {'median ms':>10} {'p20 ms':>8} {'p80 ms':>8}")
    for name, ts in times.items():
        print(f"{name:<16} {1e3 * med[name]:10.1f} {1e3 * quantile(ts, 0.2):8.1f} {1e3 * quantile(ts, 0.8):8.1f}")
    print(f"engine / plain, eager:    {med['eager engine'] / med['eager plain']:.2f}x")
    print(f"engine / plain, compiled: {med['compiled engine'] / med['compiled plain']:.2f}x")
    print(f"compiled / eager, plain:  {med['compiled plain'] / med['eager plain']:.2f}x")
    print(f"compiled / eager, engine: {med['compiled engine'] / med['eager engine']:.2f}x")


if __name__ == "__main__":
    main()
