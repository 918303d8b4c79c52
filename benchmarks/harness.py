"""Measurement: interleaved step timing in one process, and peak memory per method.

Timing: every method of a config is built in this process (own model copy, same initial
weights, same data), warmed up, then timed for R rounds; each round runs every method once,
in an order rotated by one per round (round-robin), with a device sync around each step. We
report p20/p50/p80 over rounds and the ratio of medians to the `plain` step, plus the median of
the per-round (paired) ratios, which is steadier on a loaded machine.

Memory: a FRESH SUBPROCESS per method (python -m benchmarks.memprobe) builds the method and
runs `steps` steps. CPU: peak RSS of that process (resource.getrusage ru_maxrss, the high-water
mark including the interpreter, torch and the model), and the peak above the RSS just before
the first step. GPU: torch.cuda.max_memory_allocated over the steps, in the same subprocess.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import torch

from . import methods as M
from .common import REPO, StepConfig, make_data, make_model, summarize, sync


def _timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class Interleaved:
    """Interleaved timing of several methods on one config, in this process.

    il = Interleaved(cfg, names); il.setup()   # build every method, warm up, apply the caps
    for _ in range(5): il.round()              # each round: every method once, rotated order
    il.results()                               # {method: p20/p50/p80, ratio, ...} or {"skipped": why}

    cap_s: methods in methods.CAPPED are skipped when plain_p50 * slowdown[method] > cap_s
    (slowdown: estimated ratio to plain per capped method, updated in place from measurements)."""

    def __init__(self, cfg: StepConfig, names: list[str], *, warmup: int = 1,
                 cap_s: float | None = None, slowdown: dict[str, float] | None = None, log=print):
        self.cfg = cfg
        self.names = (["plain"] if "plain" not in names else []) + list(names)
        self.warmup = max(1, warmup)
        self.cap_s = cap_s
        self.slowdown = slowdown if slowdown is not None else dict(M.CAPPED)
        self.log = log
        self.out: dict[str, dict] = {}
        self.built: dict[str, M.Method] = {}
        self.times: dict[str, list[float]] = {}
        self.r = 0

    def setup(self) -> "Interleaved":
        cfg, log = self.cfg, self.log
        torch.manual_seed(0)
        state = make_model(cfg).state_dict()
        data = make_data(cfg)
        for name in self.names:
            try:
                self.built[name] = M.build(name, cfg, state, data)
            except M.Skip as e:
                self.out[name] = {"skipped": str(e)}
                log(f"  {name:<14} skipped: {e}")
        # warm-up, plain first (one extra step: the first is cold) so the capped methods can be
        # estimated before they run
        plain_t = None
        for name in list(self.built):
            if name in M.CAPPED and self.cap_s is not None and plain_t is not None:
                f = self.slowdown.get(name, M.CAPPED[name])
                est = plain_t * f
                if est > self.cap_s:
                    self.out[name] = {"skipped": f"too slow (> {self.cap_s:g} s/step est.: ~{est:.1f} s/step "
                                                 f"= {f:.1f} x plain)", "est_s": est}
                    log(f"  {name:<14} {self.out[name]['skipped']}")
                    del self.built[name]
                    continue
            for _ in range(self.warmup + (name == "plain")):
                t = _timed(self.built[name].step, cfg.device)
            if name == "plain":
                plain_t = t
            if name in M.CAPPED and self.cap_s is not None and t > 1.5 * self.cap_s:
                self.out[name] = {"skipped": f"too slow (> {self.cap_s:g} s/step: warm-up step took {t:.1f} s)"}
                log(f"  {name:<14} {self.out[name]['skipped']}")
                del self.built[name]
        self.order = list(self.built)
        self.times = {n: [] for n in self.order}
        return self

    def round(self) -> None:
        gc.collect()
        k = self.r % len(self.order)
        for name in self.order[k:] + self.order[:k]:
            self.times[name].append(_timed(self.built[name].step, self.cfg.device))
        self.r += 1

    def results(self) -> dict:
        base = self.times["plain"]
        base_p50 = summarize(base)["p50"]
        for name in self.order:
            res = summarize(self.times[name])
            res["ratio"] = res["p50"] / base_p50
            paired = summarize([a / b for a, b in zip(self.times[name], base)])
            res["paired_ratio"] = {k: paired[k] for k in ("p20", "p50", "p80")}
            res["label"] = M.LABELS.get(name, name)
            self.out[name] = res
            if name in M.CAPPED:
                self.slowdown[name] = max(res["ratio"], 1.0)
            self.log(f"  {name:<14} p50 {res['p50']*1e3:8.1f} ms  [p20 {res['p20']*1e3:8.1f}, "
                     f"p80 {res['p80']*1e3:8.1f}]  ratio {res['ratio']:.2f} "
                     f"(paired {res['paired_ratio']['p50']:.2f})")
        return {n: self.out[n] for n in self.names if n in self.out}

    def close(self) -> None:
        self.built.clear()
        gc.collect()


def time_config(cfg: StepConfig, names: list[str], *, rounds: int = 5, warmup: int = 1,
                cap_s: float | None = None, slowdown: dict[str, float] | None = None,
                log=print) -> dict:
    """Interleaved timing of `names` on one config (see Interleaved)."""
    il = Interleaved(cfg, names, warmup=warmup, cap_s=cap_s, slowdown=slowdown, log=log).setup()
    for _ in range(rounds):
        il.round()
    res = il.results()
    il.close()
    return res


def memory_probe(cfg: StepConfig, name: str, *, steps: int = 2, timeout: float = 900,
                 repeats: int = 1) -> dict:
    """Peak memory of one method in a fresh subprocess (see module doc). With repeats > 1 the
    probe runs that many times and the run with the median peak is kept (CPU peak RSS varies
    by tens of MiB between identical runs: allocator and page-cache effects); all peaks are
    recorded under "peaks_mib"."""
    runs = [_probe_once(cfg, name, steps, timeout) for _ in range(max(1, repeats))]
    key = "gpu_peak_mib" if "gpu_peak_mib" in runs[0] else "peak_rss_mib"
    ok = [r for r in runs if key in r]
    if not ok:
        return runs[0]
    ok.sort(key=lambda r: r[key])
    best = dict(ok[len(ok) // 2])
    best["peaks_mib"] = [round(r[key], 1) for r in ok]
    failed = [r.get("error") or r.get("skipped") for r in runs if key not in r]
    if failed:
        best["failed_probes"] = failed
    return best


def _probe_once(cfg: StepConfig, name: str, steps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memprobe", "--config", json.dumps(cfg.to_dict()),
           "--method", name, "--steps", str(steps)]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"memory probe timed out after {timeout:g} s"}
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"memory probe failed (rc {p.returncode}): {p.stderr.strip()[-400:]}"}
