"""Where the time of a step goes: torch.profiler op tables of plain_concat (the floor),
inrun[torch] and authors, and the per-op difference inrun - plain_concat.

    python -m benchmarks.profile_step --config d=256,T=128,N=16,M=4 [--steps 3]
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
    args = ap.parse_args(argv)
    cfgs = [parse_config(c, StepConfig()) for c in args.config] or [StepConfig(d=256, T=128, N=16, M=4)]
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
