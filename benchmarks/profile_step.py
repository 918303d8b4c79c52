"""Where the time of a step goes: torch.profiler op tables of plain_concat (the floor),
inrun[torch] and authors, and the per-op difference inrun - plain_concat.

    python -m benchmarks.profile_step --config d=256,T=128,N=16,M=4 [--steps 3]
    python -m benchmarks.profile_step --phases --config d=256,T=128,N=16,M=1   # estimators (issue 8)

--phases: wall time per step of each phase of the estimator methods (inrun_first_sgd,
inrun_first, inrun_midpoint, inrun_second; plain and plain_concat for reference), measured by
wrapping the engine's parts from outside the package: the ghost forward+backward (eng.step), the
validation pass(es) at commit (eng._val_grads: plain forward+backward of the val rows, at shifted
weights for midpoint, with a double backward for second), the update-map arithmetic (delta / d1 /
d2 / secant of eng.update), the dense-V products (products.dense_dot), the rest of the commit
(V assembly, float64 casts, rescale check, ledger), AdamW's own step and zero_grad. Exclusive
times: a wrapped call nested in another (the update map inside the midpoint's weight shift) is
charged to itself only.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from . import methods as M
from .common import StepConfig, make_data, make_model


def op_table(m: M.Method, steps: int = 3) -> dict[str, dict]:
    m.step()   # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if m.cfg.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            m.step()
    rows = {}
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        rows[e.key] = {"self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps,
                       "total_ms": e.cpu_time_total / 1e3 / steps, "self_dev_ms": dev / 1e3 / steps}
    return rows


def profile_config(cfg: StepConfig, names=("plain_concat", "inrun[torch]", "authors"),
                   steps: int = 3, top: int = 15) -> dict:
    torch.manual_seed(0)
    state, data = make_model(cfg).state_dict(), make_data(cfg)
    tables = {}
    for name in names:
        try:
            tables[name] = op_table(M.build(name, cfg, state, data), steps)
        except M.Skip as e:
            tables[name] = {"skipped": str(e)}
    out = {"config": cfg.to_dict(), "name": cfg.name, "steps": steps, "top": {}, "diff": []}
    key = "self_dev_ms" if cfg.device.startswith("cuda") else "self_ms"
    for name, t in tables.items():
        if "skipped" in t:
            out["top"][name] = t
            continue
        total = sum(r[key] for r in t.values())
        rows = sorted(t.items(), key=lambda kv: -kv[1][key])[:top]
        out["top"][name] = {"total_self_ms": total,
                            "ops": [{"op": k, **v} for k, v in rows]}
    base, ours = tables.get("plain_concat"), tables.get("inrun[torch]")
    if base and ours and "skipped" not in base and "skipped" not in ours:
        diff = []
        for k in set(base) | set(ours):
            a, b = base.get(k, {}).get(key, 0.0), ours.get(k, {}).get(key, 0.0)
            ca, cb = base.get(k, {}).get("calls", 0), ours.get(k, {}).get("calls", 0)
            diff.append({"op": k, "plain_concat_ms": a, "inrun_ms": b, "extra_ms": b - a,
                         "plain_concat_calls": ca, "inrun_calls": cb})
        diff.sort(key=lambda r: -r["extra_ms"])
        out["diff"] = diff[:top]
        out["extra_total_ms"] = sum(r["extra_ms"] for r in diff)
    return out


def _rep_desc(r) -> str:
    kind = type(r).__name__
    if hasattr(r, "A"):
        return f"{kind}(d={r.A.shape[-1]},p={r.B.shape[-1]}{',bias' if getattr(r, 'bias', False) else ''})"
    if hasattr(r, "num_rows"):
        return f"{kind}(V={r.num_rows},d={r.B.shape[-1]})"
    return f"{kind}({tuple(r.G.shape[1:])})" if hasattr(r, "G") else kind


def product_times(cfg: StepConfig, steps: int = 3) -> dict:
    """Wall time of each train x val product call of inrun[torch] (products.dot wrapped with a
    timer from outside the package), grouped by the pair of reps, per step; and the whole step."""
    import time
    from inrun_kernels import products
    torch.manual_seed(0)
    m = M.build("inrun[torch]", cfg, make_model(cfg).state_dict(), make_data(cfg))
    m.step()
    acc: dict[str, list] = {}
    orig = products.dot

    def timed(train, val, *, per_val):
        t0 = time.perf_counter()
        out = orig(train, val, per_val=per_val)
        key = f"{_rep_desc(train)} x {_rep_desc(val)}"
        a = acc.setdefault(key, [0.0, 0])
        a[0] += time.perf_counter() - t0
        a[1] += 1
        return out

    products.dot = timed
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            m.step()
        total = (time.perf_counter() - t0) / steps
    finally:
        products.dot = orig
    rows = sorted(({"pair": k, "ms": v[0] / steps * 1e3, "calls": v[1] / steps} for k, v in acc.items()),
                  key=lambda r: -r["ms"])
    return {"config": cfg.to_dict(), "name": cfg.name, "step_ms": total * 1e3,
            "products_ms": sum(r["ms"] for r in rows), "by_pair": rows}


PHASES = ("ghost fwd+bwd (eng.step)", "validation pass", "update map", "dense-V products",
          "commit other", "AdamW step", "zero_grad", "plain fwd+bwd")


class _Clock:
    """Exclusive wall time per phase for nested wrapped calls."""

    def __init__(self):
        self.ms = {k: 0.0 for k in PHASES}
        self.stack: list[list] = []   # [phase, start, children]

    def wrap(self, phase: str, fn):
        import time

        def inner(*a, **k):
            self.stack.append([phase, time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                ph, t0, kids = self.stack.pop()
                dt = time.perf_counter() - t0
                self.ms[ph] += (dt - kids) * 1e3
                if self.stack:
                    self.stack[-1][2] += dt
        return inner


def phase_times(cfg: StepConfig, names=("plain", "plain_concat", "inrun_first_sgd", "inrun_first",
                                        "inrun_midpoint", "inrun_second"), steps: int = 3,
                state=None, data=None) -> dict:
    """Per-step wall ms of each phase (see module doc) for each method; methods built on the same
    weights and data, one warm-up step each, then `steps` timed steps per method in turn."""
    import time
    from inrun_kernels import products
    if state is None:
        torch.manual_seed(0)
        state, data = make_model(cfg).state_dict(), make_data(cfg)
    out = {"config": cfg.to_dict(), "name": cfg.name, "steps": steps, "methods": {}}
    for name in names:
        try:
            m = M.build(name, cfg, state, data)
        except M.Skip as e:
            out["methods"][name] = {"skipped": str(e)}
            continue
        clock = _Clock()
        orig_dense = products.dense_dot
        eng = getattr(m, "eng", None)
        opt_step = m.opt.step
        by_rep: dict[str, list] = {}
        if eng is not None:
            def dense(rep, *a, _f=clock.wrap("dense-V products", orig_dense), **k):
                t0 = time.perf_counter()
                try:
                    return _f(rep, *a, **k)
                finally:
                    e = by_rep.setdefault(_rep_desc(rep), [0.0, 0])
                    e[0] += time.perf_counter() - t0
                    e[1] += 1
            eng.step = clock.wrap("ghost fwd+bwd (eng.step)", eng.step)
            eng.commit = clock.wrap("commit other", eng.commit)
            eng._val_grads = clock.wrap("validation pass", eng._val_grads)
            for fn in ("delta", "d1", "d2", "secant"):
                setattr(eng.update, fn, clock.wrap("update map", getattr(eng.update, fn)))
            products.dense_dot = dense
        else:
            m.loss_fn = clock.wrap("plain fwd+bwd", m.loss_fn)
        m.opt.step = clock.wrap("AdamW step", opt_step)
        m.opt.zero_grad = clock.wrap("zero_grad", m.opt.zero_grad)
        try:
            m.step()   # warm-up (and the first AdamW step creates its state)
            clock.ms = {k: 0.0 for k in PHASES}
            by_rep.clear()
            t0 = time.perf_counter()
            for _ in range(steps):
                m.step()
            total = (time.perf_counter() - t0) * 1e3 / steps
        finally:
            products.dense_dot = orig_dense
        ph = {k: v / steps for k, v in clock.ms.items() if v}
        if eng is None:   # the plain step: forward+loss wrapped; backward is the rest
            ph["plain fwd+bwd"] = total - ph.get("AdamW step", 0.0) - ph.get("zero_grad", 0.0)
        ph["unaccounted"] = total - sum(ph.values())
        out["methods"][name] = {"step_ms": total, "phases_ms": ph}
        if by_rep:
            out["methods"][name]["dense_by_rep"] = sorted(
                ({"rep": k, "ms": v[0] * 1e3 / steps, "calls": v[1] / steps} for k, v in by_rep.items()),
                key=lambda r: -r["ms"])
        del m
    return out


def print_phases(r: dict) -> None:
    print(f"== phases of {r['name']} (wall ms per step, {r['steps']} steps)")
    cols = list(PHASES) + ["unaccounted"]
    for name, t in r["methods"].items():
        if "skipped" in t:
            print(f"  {name}: skipped: {t['skipped']}")
            continue
        parts = ", ".join(f"{k} {t['phases_ms'][k]:.0f}" for k in cols if abs(t["phases_ms"].get(k, 0)) >= 0.5)
        print(f"  {name:<16} {t['step_ms']:7.0f} ms: {parts}")
        if t.get("dense_by_rep"):
            print("      dense-V by rep: " + ", ".join(f"{r['rep']} {r['ms']:.0f} ms ({r['calls']:.0f})"
                                               for r in t["dense_by_rep"][:6]))


def profile_configs(cfgs, **kw) -> list[dict]:
    out = []
    for c in cfgs:
        r = profile_config(c, **kw)
        try:
            r["products"] = product_times(c, kw.get("steps", 3))
        except M.Skip as e:
            r["products"] = {"skipped": str(e)}
        out.append(r)
    return out


def main(argv=None) -> int:
    from .run import parse_config
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default="plain_concat,inrun[torch],authors")
    ap.add_argument("--json", default=None)
    ap.add_argument("--phases", action="store_true",
                    help="phase times of the estimator methods instead of the op tables (see above)")
    args = ap.parse_args(argv)
    cfgs = [parse_config(c, StepConfig()) for c in args.config] or [StepConfig(d=256, T=128, N=16, M=4)]
    if args.phases:
        res = []
        for c in cfgs:
            res.append(phase_times(c, steps=args.steps))
            print_phases(res[-1])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    res = profile_configs(cfgs, names=tuple(args.methods.split(",")), steps=args.steps)
    for r in res:
        print(f"== {r['name']}")
        for name, t in r["top"].items():
            if "skipped" in t:
                print(f"  {name}: skipped: {t['skipped']}")
                continue
            print(f"  {name}: total self {t['total_self_ms']:.1f} ms/step")
            for o in t["ops"][:10]:
                print(f"    {o['self_ms']:8.2f} ms  {o['calls']:6.0f} calls  {o['op']}")
        pt = r.get("products", {})
        if "by_pair" in pt:
            print(f"  inrun[torch] step {pt['step_ms']:.0f} ms, of which train x val products "
                  f"{pt['products_ms']:.0f} ms:")
            for o in pt["by_pair"][:10]:
                print(f"    {o['ms']:8.2f} ms  {o['calls']:4.0f} calls  {o['pair']}")
        if r["diff"]:
            print(f"  inrun - plain_concat: {r['extra_total_ms']:+.1f} ms/step; top ops:")
            for o in r["diff"][:12]:
                print(f"    {o['extra_ms']:+8.2f} ms  ({o['plain_concat_calls']:.0f} -> {o['inrun_calls']:.0f} calls)  {o['op']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
