"""Render benchmarks/RESULTS.md and PNG plots from the runner's JSON.

    python -m benchmarks.report [--json benchmarks/results/cpu.json ...] [--out benchmarks/RESULTS.md]

Several JSON files (e.g. a CPU run and a GPU run) are rendered one after the other. Tables:
ratio of each method's median step time to the plain train-only step measured in the same run,
p50 in ms, and peak memory per method; the issue's targets with pass/miss; the profile of where
the extra time goes, if the run recorded one; kernel timings, if recorded. Plots (overhead vs
sequence length, memory vs sequence length) go next to the output file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

from .common import REPO, hardware_line

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["plain", "plain_concat", "inrun[torch]", "inrun[triton]", "inrun[cpp]", "authors", "vmap", "loop",
         "inrun_first_sgd", "inrun_first", "inrun_midpoint", "inrun_second"]
SHORT = {"plain": "plain (train)", "plain_concat": "plain (train+val)", "inrun[torch]": "InRun torch",
         "inrun[triton]": "InRun triton", "inrun[cpp]": "InRun cpp", "authors": "(a) authors",
         "vmap": "(b) vmap", "loop": "(c) bs-1 loop", "inrun_first_sgd": "first / sgd",
         "inrun_first": "first / optimizer", "inrun_midpoint": "midpoint / optimizer",
         "inrun_second": "second / optimizer"}


def _methods(res: dict) -> list[str]:
    seen = {m for c in res["configs"] for m in c["time"]}
    return [m for m in ORDER if m in seen] + sorted(seen - set(ORDER))


def _cfg_cell(c: dict) -> str:
    k = c["config"]
    s = f"d{k['d']} T{k['T']} N{k['N']} M{k['M']}"
    if k.get("n_layer", 4) != 4 or k.get("vocab", 8192) != 8192:
        s = f"L{k['n_layer']} " + s + f" V{k['vocab']}"
    if k.get("autocast", "none") != "none":
        s += f" {k['autocast']}"
    return s


def _mem_key(res: dict) -> tuple[str, str]:
    gpu = any(c["config"].get("device", "cpu").startswith("cuda") for c in res["configs"])
    return ("gpu_peak_mib", "gpu_step_mib") if gpu else ("peak_rss_mib", "step_rss_mib")


def _time_cell(t: dict | None) -> str:
    if not t:
        return "-"
    if "skipped" in t:
        return "skipped" + ("*" if "too slow" in t["skipped"] else "")
    return f"**{t['ratio']:.2f}** ({t['p50'] * 1e3:.0f})"


def _mem_cell(m: dict | None, key: str, step_key: str, ref: dict | None) -> str:
    if not m:
        return "-"
    if "skipped" in m:
        return "skipped"
    if key not in m:
        return "error"
    cell = f"{m[key]:.0f} / {m[step_key]:.0f}"
    if ref and key in ref and ref is not m:
        cell += f" ({m[key] / ref[key]:.2f}x)"
    return cell


def _target_table(title: str, rows) -> list[str]:
    return [title, "", "| target | measured | verdict |", "|---|---|---|",
            *(f"| {a} | {b} | {v} |" for a, b, v in rows), ""]


def targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue's CPU targets, where the run covers them."""
    from .methods import TARGETS
    rows = []
    key, step_key = _mem_key(res)
    for c in res["configs"]:
        k = c["config"]
        t = c["time"]
        ours = t.get("inrun[torch]", {})
        if "ratio" not in ours:
            continue
        if (k["d"], k["T"], k["N"], k["n_layer"]) == (256, 128, 16, 4) and k["M"] in (1, 4):
            lim = TARGETS["inrun_ratio_M1" if k["M"] == 1 else "inrun_ratio_M4"]
            r = ours["ratio"]
            pr = ours["paired_ratio"]["p50"]
            rows.append((f"InRun first order, {_cfg_cell(c)}: ratio <= {lim:.2f}",
                         f"{r:.2f} (paired {pr:.2f}, p20-p80 {ours['paired_ratio']['p20']:.2f}-"
                         f"{ours['paired_ratio']['p80']:.2f})", "holds" if r <= lim else "MISSED"))
        mem = c.get("memory", {})
        a, b = mem.get("inrun[torch]", {}), mem.get("plain_concat", {})
        if key in a and key in b:
            lim = TARGETS["inrun_mem_vs_concat"]
            r_peak = a[key] / b[key]
            r_step = a[step_key] / max(b[step_key], 1e-9)
            rows.append((f"InRun peak memory <= concat plain + 5%, {_cfg_cell(c)}",
                         f"peak {r_peak:.3f}x, step part {r_step:.3f}x",
                         "holds" if r_peak <= lim else "MISSED"))
        au = t.get("authors", {})
        if "p50" in au:
            rows.append((f"InRun faster than (a) authors, {_cfg_cell(c)}",
                         f"{ours['p50'] * 1e3:.0f} vs {au['p50'] * 1e3:.0f} ms",
                         "holds" if ours["p50"] < au["p50"] else "MISSED"))
    return rows


def split_targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 12's CPU targets (the split route), judged on the
    InRun column that runs what INRUN_BACKEND=auto runs on CPU (cpp: the C++ split kernel, the
    reference for the other products), else the torch one; each figure beside its floor."""
    from .methods import SPLIT_TARGETS as TG
    rows = []
    key, _ = _mem_key(res)
    for c in res["configs"]:
        k, t = c["config"], c["time"]
        col = next((m for m in ("inrun[cpp]", "inrun[torch]") if "ratio" in t.get(m, {})), None)
        floor = t.get("plain_concat", {})
        if col is None or "ratio" not in floor:
            continue
        r, fl, name = t[col]["ratio"], floor["ratio"], f"{SHORT[col]}, {_cfg_cell(c)}"
        base = (k["d"], k["N"], k["n_layer"], k.get("vocab", 8192)) == (256, 16, 4, 8192)
        if base and k["T"] == 128 and k["M"] in (1, 4):
            lim = TG["ratio_M1" if k["M"] == 1 else "ratio_M4"]
            rows.append((f"{name}: <= {lim:.2f}x plain", f"{r:.2f} (concatenated step {fl:.2f})",
                         "holds" if r <= lim else "MISSED"))
        if k["T"] == 256:
            lim = TG["t256_vs_concat"]
            rows.append((f"{name}: <= {lim:.2f}x the concatenated step", f"{r / fl:.2f} ({r:.2f} / {fl:.2f})",
                         "holds" if r / fl <= lim else "MISSED"))
        for other, slack, what in (("vmap", 1.0, "faster than (b) vmap"),
                                   ("loop", TG["vs_loop"], "no slower than (c) loop + 5%")):
            o = t.get(other, {})
            if "ratio" in o:
                rows.append((f"{name}: {what}", f"{r:.2f} vs {o['ratio']:.2f}",
                             "holds" if (r < o["ratio"] if slack == 1.0 else r <= slack * o["ratio"]) else "MISSED"))
        mem = c.get("memory", {})
        a, b = mem.get(col, {}), mem.get("plain_concat", {})
        if key in a and key in b:
            rows.append((f"{name}: peak memory <= concatenated step + 5%", f"{a[key] / b[key]:.3f}x",
                         "holds" if a[key] / b[key] <= TG["mem_vs_concat"] else "MISSED"))
    return rows


def plots(res: dict, prefix: str, outdir: str = HERE) -> list[str]:
    """overhead vs T and memory vs T, one panel per (d, M) at the largest N; returns file names."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:   # noqa: BLE001
        return []
    key, _ = _mem_key(res)
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    maxN = defaultdict(int)
    for c in res["configs"]:
        k = c["config"]
        maxN[(k["d"], k["M"])] = max(maxN[(k["d"], k["M"])], k["N"])
    for c in res["configs"]:
        k = c["config"]
        if k["N"] != maxN[(k["d"], k["M"])]:
            continue
        for m, t in c["time"].items():
            mem = c.get("memory", {}).get(m, {})
            groups[(k["d"], k["M"], k["N"])][m].append((k["T"], t.get("ratio"), mem.get(key)))
    panels = sorted(groups)
    if not panels:
        return []
    files = []
    for what, idx, ylabel, fname in (("overhead", 1, "step time / plain train step", f"{prefix}overhead_vs_T.png"),
                                     ("memory", 2, "peak memory (MiB)", f"{prefix}memory_vs_T.png")):
        if not any(p[idx] is not None for g in groups.values() for pts in g.values() for p in pts):
            continue   # (a run without memory probes: no empty plot)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, pk in zip(axes[0], panels):
            for m in _methods(res):
                pts = sorted((p[0], p[idx]) for p in groups[pk].get(m, []) if p[idx] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=SHORT.get(m, m),
                            linestyle="--" if m.startswith("plain") else "-")
            ax.set_title(f"d={pk[0]}, M={pk[1]}, N={pk[2]}")
            ax.set_xlabel("sequence length T")
            ax.set_xscale("log", base=2)
            if what == "overhead":
                ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{what} vs sequence length — {res['meta']['hardware']['cpu'][:60]}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, fname), dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def _run_header(res: dict, src: str) -> list[str]:
    meta = res["meta"]
    L = []
    L.append(f"### Run `{os.path.relpath(os.path.abspath(src), REPO)}` ({meta.get('started', '?')}, {meta.get('wall_s', 0):.0f} s)")
    L.append("")
    L.append(f"Hardware: {hardware_line(meta)}.")
    load0, load1 = meta["hardware"].get("loadavg_at_start"), meta.get("loadavg_at_end")
    if load0 or load1:
        cores = meta["hardware"].get("affinity") or meta["hardware"].get("cores") or 1
        loaded = max((load0 or [0])[0], (load1 or [0])[0]) > 0.5 * cores
        L.append(f"Load average at start {load0[0] if load0 else '?':.2f}, at end {load1[0] if load1 else '?':.2f} "
                 f"on {cores} cores" + (" — **shared, loaded machine: absolute times are noisy; ratios are "
                                         "interleaved per round, which cancels slow drifts but not bursts.**"
                                         if loaded else "."))
    for n in meta.get("notes", []):
        L.append(f"Note: {n}")
    L.append(f"Timing: {meta['timing']}; {meta['rounds']} rounds after {meta['warmup']} warm-up step(s). "
             f"Memory: {meta['memory']}.")
    L.append("")
    return L


def render(res: dict, src: str, prefix: str, outdir: str = HERE) -> str:
    key, step_key = _mem_key(res)
    methods = _methods(res)
    L = _run_header(res, src)
    L.append("Step time: **ratio to the plain train-only step** (p50 ms). `skipped*` = too slow, see below.")
    L.append("")
    L.append("| config | " + " | ".join(SHORT.get(m, m) for m in methods) + " |")
    L.append("|---" * (len(methods) + 1) + "|")
    for c in res["configs"]:
        L.append(f"| {_cfg_cell(c)} | " + " | ".join(_time_cell(c["time"].get(m)) for m in methods) + " |")
    L.append("")
    if any("memory" in c for c in res["configs"]):
        what = "GPU max_memory_allocated" if key.startswith("gpu") else "peak RSS of a fresh process"
        L.append(f"Peak memory, MiB: {what} / the part above the process's memory just before the first "
                 "step (x = peak relative to the concatenated plain step).")
        L.append("")
        L.append("| config | " + " | ".join(SHORT.get(m, m) for m in methods) + " |")
        L.append("|---" * (len(methods) + 1) + "|")
        for c in res["configs"]:
            mem = c.get("memory", {})
            ref = mem.get("plain_concat")
            L.append(f"| {_cfg_cell(c)} | " + " | ".join(_mem_cell(mem.get(m), key, step_key, ref)
                                                        for m in methods) + " |")
        L.append("")
    L.append("Spread (p20-p80 of per-round paired ratios to plain):")
    L.append("")
    L.append("| config | " + " | ".join(SHORT.get(m, m) for m in methods) + " |")
    L.append("|---" * (len(methods) + 1) + "|")
    for c in res["configs"]:
        cells = []
        for m in methods:
            t = c["time"].get(m)
            cells.append(f"{t['paired_ratio']['p20']:.2f}-{t['paired_ratio']['p80']:.2f}" if t and "paired_ratio" in t else "-")
        L.append(f"| {_cfg_cell(c)} | " + " | ".join(cells) + " |")
    L.append("")
    skips = {}
    for c in res["configs"]:
        for m, t in c["time"].items():
            if "skipped" in t:
                skips.setdefault((m, t["skipped"].split(" (")[0] if "too slow" in t["skipped"] else t["skipped"]),
                                 []).append(_cfg_cell(c))
    if skips:
        L.append("Skipped:")
        L.append("")
        for c in res["configs"]:
            for m, t in c["time"].items():
                if "skipped" in t and "too slow" in t["skipped"]:
                    L.append(f"- {SHORT.get(m, m)} at {_cfg_cell(c)}: {t['skipped']}")
        for (m, why), cfgs in skips.items():
            if "too slow" not in why:
                L.append(f"- {SHORT.get(m, m)} (all configs): {why}")
        L.append("")
    if res.get("left_out"):
        L.append("Configs left out of this run: " + ", ".join(f"{x['name']} ({x['why']})" for x in res["left_out"]))
        L.append("")
    tg = targets(res)
    if tg:
        L += _target_table("Targets (issue 5):", tg)
    tg = split_targets(res)
    if tg:
        L += _target_table("Targets (issue 12, the split route):", tg)
    for pr in res.get("profile", []):
        L.append(f"Profile of {pr['name']} (torch.profiler, self CPU time per step, {pr['steps']} steps):")
        L.append("")
        for name, t in pr["top"].items():
            if "skipped" in t:
                continue
            ops = ", ".join(f"{o['op']} {o['self_ms']:.0f}" for o in t["ops"][:6])
            L.append(f"- {SHORT.get(name, name)}: total {t['total_self_ms']:.0f} ms; top ops (ms): {ops}")
        if pr.get("diff"):
            ops = ", ".join(f"{o['op']} {o['extra_ms']:+.0f} ({o['plain_concat_calls']:.0f}->{o['inrun_calls']:.0f} calls)"
                            for o in pr["diff"][:8])
            L.append(f"- InRun minus plain (train+val): {pr['extra_total_ms']:+.0f} ms/step; by op: {ops}")
        pt = pr.get("products", {})
        if "by_pair" in pt:
            pairs = ", ".join(f"{o['pair']} {o['ms']:.1f} ms ({o['calls']:.0f} calls)" for o in pt["by_pair"][:8])
            L.append(f"- InRun train x val products (products.dot timed from outside): {pt['products_ms']:.0f} "
                     f"of {pt['step_ms']:.0f} ms/step; by rep pair: {pairs}")
        L.append("")
    if res.get("kernels"):
        L.append("Kernels: p50 ms (ratio to the reference function called directly).")
        L.append("")
        impls = ["reference", "torch", "triton", "cpp"]
        L.append("| primitive | shape | " + " | ".join(impls) + " |")
        L.append("|---|---|" + "---|" * len(impls))
        for k in res["kernels"]:
            cells = []
            for i in impls:
                r = k["impls"].get(i, {})
                cells.append("skipped" if "skipped" in r else f"{r['p50'] * 1e3:.2f} ({r['ratio_to_reference']:.2f})" if r else "-")
            L.append(f"| {k['primitive']} | {k['shape_name']} | " + " | ".join(cells) + " |")
        kinds = {i: k["impls"][i]["skipped"] for k in res["kernels"] for i in impls if "skipped" in k["impls"].get(i, {})}
        for i, why in kinds.items():
            L.append(f"\n{i}: skipped: {why}")
        L.append("")
    files = plots(res, prefix, outdir)
    for f in files:
        L.append(f"![{f}]({f})")
    L.append("")
    return "\n".join(L)


def is_estimator_run(res: dict) -> bool:
    return res.get("meta", {}).get("kind") == "estimators"


def _is_estimator_target_cfg(k: dict) -> bool:
    return ((k["d"], k["T"], k["N"], k["M"], k.get("n_layer", 4), k.get("vocab", 8192))
            == (256, 128, 16, 1, 4, 8192) and k.get("autocast", "none") == "none")


def estimator_targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the estimator cost targets of issue 8, at the config they
    are defined for (d256 T128 N16 M1, 4 layers, vocab 8192)."""
    from .methods import ESTIMATOR_TARGETS
    tg = {**ESTIMATOR_TARGETS, **res["meta"].get("targets", {})}
    key, step_key = _mem_key(res)
    rows = []
    for c in res["configs"]:
        if not _is_estimator_target_cfg(c["config"]):
            continue
        t = c["time"]
        for name, what in (("inrun_first", "first order, update=optimizer"),
                           ("inrun_midpoint", "midpoint, update=optimizer")):
            r = t.get(name, {})
            lim = tg[name]
            if "ratio" not in r:
                rows.append((f"{what}: step time <= {lim:.2f}x plain, {_cfg_cell(c)}",
                             r.get("skipped", "not run"), "not measured"))
                continue
            pr = r["paired_ratio"]
            rows.append((f"{what}: step time <= {lim:.2f}x plain, {_cfg_cell(c)}",
                         f"{r['ratio']:.2f} (paired {pr['p50']:.2f}, p20-p80 {pr['p20']:.2f}-{pr['p80']:.2f})",
                         "met" if r["ratio"] <= lim else "MISSED"))
        mem = c.get("memory", {})
        a, b = mem.get("inrun_midpoint", {}), mem.get("plain_concat", {})
        lim = tg["inrun_midpoint_mem_vs_concat"]
        label = f"midpoint peak memory <= {lim:.2f}x the concatenated plain step, {_cfg_cell(c)}"
        if key in a and key in b:
            r_peak = a[key] / b[key]
            r_step = a[step_key] / max(b[step_key], 1e-9)
            rows.append((label, f"peak {a[key]:.0f} vs {b[key]:.0f} MiB = {r_peak:.3f}x "
                                f"(step part {a[step_key]:.0f} vs {b[step_key]:.0f} MiB = {r_step:.2f}x)",
                         "met" if r_peak <= lim else "MISSED"))
        else:
            rows.append((label, (a or b).get("skipped", "not measured"), "not measured"))
    return rows


def render_estimators(res: dict, src: str) -> str:
    """The "Estimator cost" section (issue 8) from a `python -m benchmarks.run --estimators` JSON."""
    key, step_key = _mem_key(res)
    est = res["meta"].get("estimators", {})
    L = ["## Estimator cost (issue 8)", ""]
    L.append("`InRunShapley(estimator=..., update=...)`, torch backend, AdamW; one step = `eng.step` + "
             "`optimizer.step()` (the values are committed there) + `zero_grad`. first / sgd = the old "
             "SGD-proxy value (lr/N)<g_i, g_val>; first / optimizer = the secant of AdamW's update map "
             "(the default); midpoint = the validation gradient at the half-step point; second = a "
             "Hessian-vector product (double backward). Ratios are to the plain train-only step timed in "
             "the same process, interleaved; targets: first (update=optimizer) <= 1.45x plain, midpoint "
             "<= 1.8x plain, midpoint peak memory <= 1.3x the concatenated plain step (d256 T128 N16 M1).")
    L.append("")
    L += _run_header(res, src)
    for c in res["configs"]:
        t, mem = c["time"], c.get("memory", {})
        ref = mem.get("plain_concat", {})
        L.append(f"{_cfg_cell(c)} (4-layer GPT-2, vocab {c['config'].get('vocab')}):" if c["config"].get("n_layer", 4) == 4
                 else f"{_cfg_cell(c)}:")
        L.append("")
        L.append("| method | estimator / update | p50 ms (p20-p80) | ratio to plain | paired ratio p50 (p20-p80) "
                 "| peak MiB / step part | peak vs concat |")
        L.append("|---|---|---|---|---|---|---|")
        for m in [m for m in ORDER if m in t] + sorted(set(t) - set(ORDER)):
            r = t[m]
            eu = est.get(m)
            eu = f"{eu['estimator']} / {eu['update']}" if eu else "- (baseline)"
            if "skipped" in r:
                L.append(f"| `{m}` | {eu} | skipped: {r['skipped']} | - | - | - | - |")
                continue
            pr = r["paired_ratio"]
            mm = mem.get(m)
            if mm and key in mm:
                mcell = f"{mm[key]:.0f} / {mm[step_key]:.0f}"
                vs = f"{mm[key] / ref[key]:.3f}x" if key in ref else "-"
            else:
                mcell = "skipped" if mm and "skipped" in mm else "error" if mm else "-"
                vs = "-"
            L.append(f"| `{m}` | {eu} | {r['p50'] * 1e3:.0f} ({r['p20'] * 1e3:.0f}-{r['p80'] * 1e3:.0f}) "
                     f"| **{r['ratio']:.2f}** | {pr['p50']:.2f} ({pr['p20']:.2f}-{pr['p80']:.2f}) | {mcell} | {vs} |")
        L.append("")
        peaks = {m: mm["peaks_mib"] for m, mm in mem.items() if "peaks_mib" in mm}
        if peaks:
            L.append("Memory probes (every fresh-process peak, MiB; the median is kept): "
                     + "; ".join(f"`{m}` {', '.join(f'{x:.0f}' for x in v)}" for m, v in peaks.items())
                     + ".")
            L.append("")
    for ph in res.get("phases", []):
        from .profile_step import PHASES
        cols = [k for k in (*PHASES, "unaccounted")
                if any(abs(t.get("phases_ms", {}).get(k, 0.0)) >= 0.5 for t in ph["methods"].values())]
        L.append(f"Where the time goes, {_cfg_cell(ph)} (wall ms per step by phase, {ph['steps']} steps per "
                 "method after one warm-up, not interleaved; `python -m benchmarks.profile_step --phases`):")
        L.append("")
        L.append("| method | step | " + " | ".join(cols) + " |")
        L.append("|---|---|" + "---|" * len(cols))
        for m, t in ph["methods"].items():
            if "skipped" in t:
                continue
            L.append(f"| `{m}` | {t['step_ms']:.0f} | "
                     + " | ".join(f"{t['phases_ms'].get(k, 0.0):.0f}" for k in cols) + " |")
        L.append("")
        for m, t in ph["methods"].items():
            if t.get("dense_by_rep"):
                L.append(f"- `{m}` dense-V products by training rep (ms per step, calls): "
                         + ", ".join(f"{r['rep']} {r['ms']:.0f} ({r['calls']:.0f})" for r in t["dense_by_rep"][:6]))
        if any(t.get("dense_by_rep") for t in ph["methods"].values()):
            L.append("")
    tg = estimator_targets(res)
    if tg:
        L += _target_table("Targets (issue 8):", tg)
    else:
        L.append("(The targets are defined at d256 T128 N16 M1, which this run does not include.)")
        L.append("")
    return "\n".join(L)


HEADER = """# Benchmark results

Generated by `python -m benchmarks.report` from the JSON of `python -m benchmarks.run`; do not
edit by hand. Methods: plain (train) = forward, mean loss, backward, AdamW step, zero_grad on the
training batch (the baseline, ratio 1.00); plain (train+val) = the same on the concatenated batch
(the floor of any one-backward method); InRun = `ik.InRunShapley` first order per backend;
(a) = the authors' hook engine with materialised (N*T) x (M*T) Grams, fp32 instead of their bf16,
exact; (b) = torch.func vmap per-sample gradients, exact; (c) = batch-size-1 loop, exact
(see benchmarks/baselines.py; correctness: tests/test_benchmarks_smoke.py).
"""


EST_BEGIN, EST_END = "<!-- estimators:begin -->", "<!-- estimators:end -->"
_BLOCK = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->\n?", re.S)


def splice(text: str, begin: str, end: str, block: str) -> str:
    """text with the part from `begin` to `end` (markers included) replaced by block (which
    carries its own markers), or block appended when the markers are absent."""
    if begin in text and end in text and text.index(begin) < text.index(end):
        a, b = text.index(begin), text.index(end) + len(end)
        if text[b:b + 1] == "\n":
            b += 1
        return text[:a] + block + text[b:]
    return text.rstrip("\n") + "\n\n" + block


def estimator_block(est_runs: list[tuple[str, dict]]) -> str:
    body = "\n".join(render_estimators(res, src) for src, res in est_runs)
    return f"{EST_BEGIN}\n{body.rstrip()}\n{EST_END}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="append", default=[], help="runner JSON (repeatable)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--preface", default=None, help="a Markdown file inserted after the header")
    ap.add_argument("--estimators", action="append", default=None,
                    help="JSON of `python -m benchmarks.run --estimators`, rendered as the 'Estimator cost' "
                         "section (repeatable; default: benchmarks/results/estimators_cpu.json when it "
                         "exists; a --json file of that kind is rendered the same way)")
    ap.add_argument("--no-estimators", action="store_true", help="leave the Estimator cost section out")
    ap.add_argument("--only-estimators", action="store_true",
                    help="rewrite only the Estimator cost section of --out (between its "
                         "<!-- estimators:begin/end --> markers, appended if absent); the rest of the "
                         "file, plots included, is left as it is")
    args = ap.parse_args(argv)
    est_srcs = list(args.estimators or [])
    if args.estimators is None:
        default = os.path.join(HERE, "results", "estimators_cpu.json")
        if os.path.exists(default):
            est_srcs.append(default)
    srcs = args.json or ([] if args.only_estimators else [os.path.join(HERE, "results", "cpu.json")])
    loaded = []
    for src in srcs:
        with open(src) as f:
            loaded.append((src, json.load(f)))
    step_runs = [(s, r) for s, r in loaded if not is_estimator_run(r)]
    est_runs = [(s, r) for s, r in loaded if is_estimator_run(r)]
    if not args.no_estimators:
        seen = {os.path.abspath(s) for s, _ in est_runs}
        for src in est_srcs:
            if os.path.abspath(src) in seen:
                continue
            with open(src) as f:
                est_runs.append((src, json.load(f)))
    else:
        est_runs = []
    old = ""
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = f.read()
    if args.only_estimators:
        if not est_runs:
            raise SystemExit("--only-estimators: no estimator JSON (run `python -m benchmarks.run --estimators`)")
        text = splice(old, EST_BEGIN, EST_END, estimator_block(est_runs)) if old else estimator_block(est_runs)
    else:
        parts = [HEADER]
        if args.preface:
            with open(args.preface) as f:
                parts.append(f.read())
        for src, res in step_runs:
            prefix = "" if len(step_runs) == 1 else os.path.splitext(os.path.basename(src))[0] + "_"
            parts.append(render(res, src, prefix, os.path.dirname(os.path.abspath(args.out))))
        text = "\n".join(parts)
        if est_runs:
            text = splice(text, EST_BEGIN, EST_END, estimator_block(est_runs))
        # sections other tools splice into the file (e.g. benchmarks.fidelity's
        # <!-- fidelity:begin/end --> block) are carried over unchanged
        for m in _BLOCK.finditer(old):
            if m.group(1) == "estimators" and est_runs:
                continue
            begin, end = f"<!-- {m.group(1)}:begin -->", f"<!-- {m.group(1)}:end -->"
            text = splice(text, begin, end, m.group(0) if m.group(0).endswith("\n") else m.group(0) + "\n")
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
