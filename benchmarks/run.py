"""Step-level benchmark runner: interleaved timings, peak memory per method (fresh subprocess
each), optional kernel timings and profiles; writes one JSON file with hardware and versions.

    python -m benchmarks.run --preset quick   --out benchmarks/results/quick.json     # < 1 min
    python -m benchmarks.run --preset targets --out benchmarks/results/targets.json   # issue targets
    python -m benchmarks.run --preset cpu     --out benchmarks/results/cpu.json       # full CPU grid
    python -m benchmarks.run --preset gpu     --out $OUT/step_gpu.json                # GPT-2 small
    python -m benchmarks.report --json benchmarks/results/cpu.json                    # RESULTS.md

Presets: quick = the smallest CPU config; targets = d256 T128 N16 M{1,4}; cpu = the issue's grid
(n_layer 4, d {256,512}, T {128,256}, N {8,16}, M {1,4}, vocab 8192, n_head 4); cpu-subset =
the d=256 half of it plus the d=512 corner configs; gpu = GPT-2 small (124M), T=1024, N=16,
M {1,4}, bf16 autocast. --config d=512,T=256,N=16,M=4 adds a config by hand (repeatable).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import harness as H
from . import methods as M
from .common import (QUICK_CONFIG, TARGET_CONFIGS, StepConfig, cpu_configs, env_info, gpt2_small,
                     hardware_line)


def preset_configs(name: str) -> list[StepConfig]:
    if name == "quick":
        return [QUICK_CONFIG]
    if name == "targets":
        return list(TARGET_CONFIGS)
    if name == "cpu":
        return cpu_configs()
    if name == "cpu-subset":
        half = cpu_configs(ds=(256,))
        corners = [StepConfig(d=512, T=128, N=8, M=1), StepConfig(d=512, T=256, N=16, M=4)]
        return half + corners
    if name == "gpu":
        return [gpt2_small(M=1), gpt2_small(M=4)]
    raise SystemExit(f"unknown preset {name!r}")


def parse_config(text: str, base: StepConfig) -> StepConfig:
    kv = dict(item.split("=", 1) for item in text.split(",") if item)
    d = base.to_dict()
    for k, v in kv.items():
        k = {"n_embd": "d", "seq": "T"}.get(k, k)
        if k not in d:
            raise SystemExit(f"unknown config key {k!r}; keys: {sorted(d)}")
        d[k] = type(d[k])(v) if not isinstance(d[k], str) else v
    return StepConfig.from_dict(d)


def shapes(cfg: StepConfig) -> dict:
    n_params = (cfg.vocab * cfg.d + max(cfg.T, 128) * cfg.d
                + cfg.n_layer * (12 * cfg.d * cfg.d + 13 * cfg.d) + 2 * cfg.d)
    return {"train": [cfg.N, cfg.T], "val": [cfg.M, cfg.T], "tokens_train": cfg.N * cfg.T,
            "tokens_val": cfg.M * cfg.T, "params": n_params, "param_dtype": cfg.dtype,
            "autocast": cfg.autocast, "device": cfg.device}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="quick | targets | cpu | cpu-subset | gpu")
    ap.add_argument("--config", action="append", default=[], help="e.g. d=256,T=128,N=16,M=1")
    ap.add_argument("--methods", default=",".join(M.method_names()),
                    help="comma list of " + ",".join(M.method_names()))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cap-s", type=float, default=None,
                    help="skip vmap/loop when their estimated s/step exceeds this "
                         "(default 8 on CPU, 30 on GPU)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--mem-repeats", type=int, default=None,
                    help="fresh-process memory probes per method, median kept (default 3 on CPU, 1 on GPU)")
    ap.add_argument("--kernels", action="store_true", help="also time the ghost primitives")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler op tables of plain_concat / inrun / authors on the target configs")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new config after this many seconds (the JSON says which were left out)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the preset's)")
    ap.add_argument("--out", default="benchmarks/results/results.json")
    ap.add_argument("--note", action="append", default=[], help="free text stored with the results")
    args = ap.parse_args(argv)

    cfgs = preset_configs(args.preset) if args.preset else []
    base = cfgs[0] if cfgs else StepConfig()
    cfgs += [parse_config(c, base) for c in args.config]
    if not cfgs:
        cfgs = [QUICK_CONFIG]
    if args.device:
        cfgs = [StepConfig.from_dict({**c.to_dict(), "device": args.device}) for c in cfgs]
    if any(c.device.startswith("cuda") for c in cfgs) and not torch.cuda.is_available():
        raise SystemExit("a CUDA config was requested but no GPU is available")
    gpu = any(c.device.startswith("cuda") for c in cfgs)
    cap = args.cap_s if args.cap_s is not None else (30.0 if gpu else 8.0)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_start = time.time()
    result = {"meta": {**env_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                       "args": vars(args), "cap_s": cap, "rounds": args.rounds, "warmup": args.warmup,
                       "notes": args.note,
                       "timing": "one process, interleaved: each round runs every method once, order "
                                 "rotated per round; p20/p50/p80 over rounds; ratio = p50 / p50(plain)",
                       "memory": ("GPU: torch.cuda.max_memory_allocated in a fresh subprocess per method"
                                  if gpu else "CPU: peak RSS (VmHWM, i.e. ru_maxrss of the fresh image) "
                                              "of a fresh subprocess per method, median of "
                                              f"{args.mem_repeats or 3} such probes (RSS varies by "
                                              "tens of MiB between identical runs)")},
              "configs": [], "left_out": []}
    print(hardware_line(result["meta"]))
    slowdown = dict(M.CAPPED)

    def save():
        result["meta"]["wall_s"] = time.time() - t_start
        result["meta"]["loadavg_at_end"] = os.getloadavg()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for cfg in cfgs:
        if args.budget_s is not None and time.time() - t_start > args.budget_s:
            result["left_out"].append({"config": cfg.to_dict(), "name": cfg.name,
                                       "why": f"time budget of {args.budget_s:g} s spent"})
            print(f"{cfg.name}: left out (time budget)")
            continue
        print(f"{cfg.name}  ({time.time() - t_start:.0f} s)")
        entry = {"name": cfg.name, "config": cfg.to_dict(), "shapes": shapes(cfg),
                 "loadavg": os.getloadavg()}
        entry["time"] = H.time_config(cfg, names, rounds=args.rounds, warmup=args.warmup, cap_s=cap,
                                      slowdown=slowdown)
        if not args.no_memory:
            entry["memory"] = {}
            for name in entry["time"]:
                if "skipped" in entry["time"][name]:
                    entry["memory"][name] = {"skipped": entry["time"][name]["skipped"]}
                    continue
                repeats = args.mem_repeats or (1 if gpu else 3)
                entry["memory"][name] = r = H.memory_probe(cfg, name, steps=args.mem_steps,
                                                           repeats=repeats)
                key = "gpu_peak_mib" if gpu else "peak_rss_mib"
                if key in r:
                    extra = f"step {r['gpu_step_mib' if gpu else 'step_rss_mib']:.0f} MiB"
                    print(f"  mem {name:<14} peak {r[key]:8.0f} MiB  ({extra})")
                else:
                    print(f"  mem {name:<14} {r}")
        result["configs"].append(entry)
        save()

    if args.profile:
        from .profile_step import profile_configs
        result["profile"] = profile_configs([c for c in cfgs if c in TARGET_CONFIGS] or cfgs[:1])
        save()
    if args.kernels:
        from .kernels import run_all
        result["kernels"] = run_all(quick=not gpu, device="cuda" if gpu else "cpu")
        save()
    save()
    print(f"wrote {args.out} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
