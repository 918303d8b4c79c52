"""Step-level benchmark runner: interleaved timings, peak memory per method (fresh subprocess
each), optional kernel timings and profiles; writes one JSON file with hardware and versions.

    python -m benchmarks.run --preset quick   --out benchmarks/results/quick.json     # < 1 min
    python -m benchmarks.run --preset targets --out benchmarks/results/targets.json   # issue targets
    python -m benchmarks.run --preset cpu     --out benchmarks/results/cpu.json       # full CPU grid
    python -m benchmarks.run --preset gpu     --out $OUT/step_gpu.json                # GPT-2 small
    python -m benchmarks.report --json benchmarks/results/cpu.json                    # RESULTS.md
    python -m benchmarks.run --estimators                  # -> benchmarks/results/estimators_cpu.json

--estimators: the estimator cost benchmark of issue 8: d256 T128 N16 M1 (unless --config or
--preset says otherwise), methods plain, plain_concat, inrun_first_sgd, inrun_first,
inrun_midpoint, inrun_second, 7 interleaved rounds, fresh-process memory probes of all but
plain (--profile adds where each method's time goes, by phase); the report renders it as the
"Estimator cost" section (targets: first <= 1.45x plain, midpoint <= 1.8x plain, midpoint peak
memory <= 1.3x the concatenated plain step).

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

ESTIMATOR_CONFIG = TARGET_CONFIGS[0]   # d256 T128 N16 M1, 4 layers, vocab 8192


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
    ap.add_argument("--methods", default=None,
                    help="comma list of " + ",".join(M.all_method_names()) + " (default: "
                         + ",".join(M.method_names()) + "; with --estimators: "
                         + ",".join(M.estimator_method_names()) + ")")
    ap.add_argument("--estimators", action="store_true",
                    help="the estimator cost benchmark (issue 8), see above")
    ap.add_argument("--mem-methods", default=None,
                    help="comma list: probe the memory of these methods only (default: every timed "
                         "method; with --estimators every one but plain)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 7 with --estimators)")
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
                    help="torch.profiler op tables of plain_concat / inrun / authors on the target configs; "
                         "with --estimators: the phase times of every method (profile_step --phases)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new config after this many seconds (the JSON says which were left out)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: the preset's)")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/results.json; with --estimators "
                         "benchmarks/results/estimators_<cpu|gpu>.json")
    ap.add_argument("--note", action="append", default=[], help="free text stored with the results")
    args = ap.parse_args(argv)

    cfgs = preset_configs(args.preset) if args.preset else []
    base = cfgs[0] if cfgs else (ESTIMATOR_CONFIG if args.estimators else StepConfig())
    cfgs += [parse_config(c, base) for c in args.config]
    if not cfgs:
        cfgs = [ESTIMATOR_CONFIG if args.estimators else QUICK_CONFIG]
    if args.rounds is None:
        args.rounds = 7 if args.estimators else 5
    if args.methods is None:
        args.methods = ",".join(M.estimator_method_names() if args.estimators else M.method_names())
    if args.mem_methods is None and args.estimators:
        args.mem_methods = ",".join(n for n in M.estimator_method_names() if n != "plain")
    if args.device:
        cfgs = [StepConfig.from_dict({**c.to_dict(), "device": args.device}) for c in cfgs]
    if any(c.device.startswith("cuda") for c in cfgs) and not torch.cuda.is_available():
        raise SystemExit("a CUDA config was requested but no GPU is available")
    gpu = any(c.device.startswith("cuda") for c in cfgs)
    cap = args.cap_s if args.cap_s is not None else (30.0 if gpu else 8.0)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    mem_names = None if args.mem_methods is None else {n.strip() for n in args.mem_methods.split(",")}
    if args.out is None:
        args.out = (f"benchmarks/results/estimators_{'gpu' if gpu else 'cpu'}.json" if args.estimators
                    else "benchmarks/results/results.json")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t_start = time.time()
    result = {"meta": {**env_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                       "args": vars(args), "cap_s": cap, "rounds": args.rounds, "warmup": args.warmup,
                       "notes": args.note,
                       "kind": "estimators" if args.estimators else "steps",
                       "timing": "one process, interleaved: each round runs every method once, order "
                                 "rotated per round; p20/p50/p80 over rounds; ratio = p50 / p50(plain)",
                       "memory": ("GPU: torch.cuda.max_memory_allocated in a fresh subprocess per method"
                                  if gpu else "CPU: peak RSS (VmHWM, i.e. ru_maxrss of the fresh image) "
                                              "of a fresh subprocess per method, median of "
                                              f"{args.mem_repeats or 3} such probes (RSS varies by "
                                              "tens of MiB between identical runs)")},
              "configs": [], "left_out": []}
    if args.estimators:
        result["meta"]["targets"] = dict(M.ESTIMATOR_TARGETS)
        result["meta"]["estimators"] = {n: {"estimator": e, "update": u}
                                        for n, (e, u) in M.ESTIMATORS.items()}
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
                if mem_names is not None and name not in mem_names:
                    continue
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

    if args.profile and args.estimators:
        from .profile_step import phase_times
        result["phases"] = [phase_times(c, names=tuple(n for n in names)) for c in cfgs]
        save()
    elif args.profile:
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
