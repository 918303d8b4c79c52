"""A Markdown report of a run's values, with plots.

    python -m inrun_kernels report VALUES [--groups FILE] [--names FILE] [--top K] [--out DIR]
                                          [--texts FILE]

VALUES: a file of Values.save (safetensors + sidecar), or of InRunShapley.save / ValueLedger.save
(a torch file). --groups: one int group id per sample (-1 = none): .npy, .pt/.pth (a 1-D integer
tensor, or a dict with "groups"), or text with one int per line. --names: group names, a JSON
list (.json) or one per line. --texts: one text per sample, .jsonl (a JSON string, or an object
whose "text" field is shown) or plain text with one per line. Writes DIR/report.md,
DIR/values_hist.png and DIR/groups.png (when there are groups or a history). Matplotlib is drawn
through its Agg canvas directly (no pyplot: the process's backend is left alone).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys

import torch
from torch import Tensor

from .ledger import atomic_write
from .results import Values, _chunks

HIST_SAMPLE = 1 << 18     # seen values sampled (strided) to choose the histogram's range
MAX_LINES = 8             # groups drawn one by one in the cumulative plot; the rest as "other"
MAX_BARS = 20             # groups in the bar chart
MAX_GROUP_ROWS = 30       # group table rows (beyond: the 15 largest and 15 smallest totals)
SNIPPET = 80              # characters of a text shown in a table


# ---- inputs -------------------------------------------------------------------------------------
def load_groups(path: str, num_samples: int) -> Tensor:
    """int64 [num_samples] group ids from .npy, .pt/.pth or a text file (one int per line)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        import numpy as np
        g = torch.from_numpy(np.load(path, allow_pickle=False))
    elif ext in (".pt", ".pth"):
        g = torch.load(path, weights_only=True, map_location="cpu")
        if isinstance(g, dict):
            g = g.get("groups")
        if not isinstance(g, Tensor):
            raise ValueError(f"--groups {path}: expected a tensor (or a dict with 'groups')")
    else:
        import numpy as np
        g = torch.from_numpy(np.atleast_1d(np.loadtxt(path, dtype=np.int64, ndmin=1)))
    g = g.flatten()
    if g.dtype.is_floating_point or g.dtype == torch.bool:
        raise ValueError(f"--groups {path}: group ids must be integers, got {g.dtype}")
    if g.numel() != num_samples:
        raise ValueError(f"--groups {path}: {g.numel()} group ids for {num_samples} samples "
                         "(one per sample, -1 = none)")
    return g.long()


def load_names(path: str) -> list[str]:
    """Group names: a JSON list (.json) or one name per line."""
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".json"):
            names = json.load(f)
            if not isinstance(names, list):
                raise ValueError(f"--names {path}: expected a JSON list of names")
            return [str(x) for x in names]
        return [line.rstrip("\r\n") for line in f]


def _text_of(line: str, jsonl: bool) -> str:
    if not jsonl:
        return line.rstrip("\r\n")
    obj = json.loads(line)
    if isinstance(obj, dict):
        for key in ("text", "content", "sentence", "prompt", "input"):
            if key in obj:
                return str(obj[key])
        return json.dumps(obj, ensure_ascii=False)
    return obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)


def load_texts(path: str, ids) -> dict[int, str]:
    """The texts of `ids` from a file of one text per sample (line i = sample i): .jsonl/.json
    lines (a string, or an object with "text"), else plain lines. Streams: keeps only those."""
    want = set(int(i) for i in ids)
    jsonl = path.lower().endswith((".jsonl", ".json"))
    out: dict[int, str] = {}
    if not want:
        return out
    last = max(want)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in want:
                out[i] = _text_of(line, jsonl)
            if i >= last:
                break
    return out


# ---- numbers and Markdown -----------------------------------------------------------------------
def _f(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _cell(s: str) -> str:
    s = " ".join(str(s).split())
    if len(s) > SNIPPET:
        s = s[:SNIPPET - 1] + "…"
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("`", "\\`")


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---- plots --------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the report's plots need matplotlib (pip install matplotlib)") from e
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _seen_sample(V: Values, seen: int) -> Tensor:
    """About HIST_SAMPLE values of seen ids, strided over the whole id range."""
    stride = max(1, seen // HIST_SAMPLE)
    parts = []
    for s, e in _chunks(V.num_samples):
        s0 = s + (-s) % stride
        v, c = V.values[s0:e:stride], V.counts[s0:e:stride]
        parts.append(v[c > 0])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def plot_histogram(V: Values, path: str, summ: dict, bins: int = 60) -> str:
    """Histogram of the seen ids' values; the range is the 0.1%..99.9% quantiles (of a strided
    sample) widened to include 0; what falls outside is counted in the caption."""
    sample = _seen_sample(V, summ["seen"])
    q = torch.quantile(sample, torch.tensor([0.001, 0.999], dtype=torch.float64))
    lo, hi = min(float(q[0]), 0.0), max(float(q[1]), 0.0)
    if hi - lo <= 0:
        lo, hi = lo - 1.0, hi + 1.0
    hist = torch.zeros(bins, dtype=torch.float64)
    below = above = 0
    for s, e in _chunks(V.num_samples):
        v = V.values[s:e][V.counts[s:e] > 0]
        below += int((v < lo).sum())
        above += int((v > hi).sum())
        hist += torch.histc(v, bins, lo, hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    ax.bar(edges[:-1].numpy(), hist.numpy(), width=(hi - lo) / bins, align="edge",
           color="#4C72B0", edgecolor="white", linewidth=0.3)
    positive = hist[hist > 0]
    if positive.numel() and float(positive.max()) / float(positive.min()) > 100:
        ax.set_yscale("log")
    ax.axvline(0, color="0.3", linewidth=1, linestyle=":", label="0 (no effect)")
    ax.axvline(summ["mean"], color="#C44E52", linewidth=1.5,
               label=f"mean of seen ({_f(summ['mean'], 3)})")
    ax.set_xlabel("value (sum over steps; > 0 = lowered the validation loss)")
    ax.set_ylabel("samples")
    ax.set_title(f"Values of the {summ['seen']:,} seen samples")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.legend(loc="upper right", fontsize=8)
    note = f"{_pct(summ['negative_fraction'])} negative"
    if below or above:
        note += f"\n{below:,} below / {above:,} above the plotted range"
    ax.text(0.01, 0.97, note, transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.8, edgecolor="0.8"))
    _save_png(fig, path)
    cap = (f"Histogram of the {summ['seen']:,} seen samples' values, range "
           f"[{_f(lo, 3)}, {_f(hi, 3)}] (the 0.1% to 99.9% quantiles, widened to include 0)")
    if below or above:
        cap += f"; {below:,} below and {above:,} above it are left out"
    return cap + "."


def plot_history(V: Values, path: str, names: list | None = None) -> str:
    """Cumulative value of each group over the steps (from history): the MAX_LINES groups with
    the largest |total| one by one, the rest as one line, and the sum of all."""
    h = V.history
    cum = torch.cumsum(h, 0)
    x = V.history_steps.numpy()
    g = h.shape[1]
    if names is None and V.group_names is None and g == 1:
        names = ["all samples"]
    else:
        names = [names[i] if names is not None and i < len(names) else V.group_label(i)
                 for i in range(g)]
    order = torch.argsort(cum[-1].abs(), descending=True).tolist() if h.shape[0] else list(range(g))
    shown, rest = order[:MAX_LINES], order[MAX_LINES:]
    if h.shape[0]:    # legend top to bottom as the lines end
        shown = sorted(shown, key=lambda i: -float(cum[-1, i]))
    fig = _figure(8.5, 4.6)
    ax = fig.add_subplot()
    marker = "o" if h.shape[0] <= 40 else None
    for i in shown:
        ax.plot(x, cum[:, i].numpy(), marker=marker, markersize=3, linewidth=1.5,
                label=f"{names[i]} ({_f(float(cum[-1, i]), 3)})")
    if rest:
        ax.plot(x, cum[:, rest].sum(1).numpy(), color="0.6", linewidth=1.2, marker=marker, markersize=2,
                label=f"other {len(rest)} groups ({_f(float(cum[-1, rest].sum()), 3)})")
    if g > 1:
        ax.plot(x, cum.sum(1).numpy(), color="black", linestyle="--", linewidth=1.2,
                label=f"all groups ({_f(float(cum[-1].sum()), 3)})")
    ax.axhline(0, color="0.5", linewidth=0.8, linestyle=":")
    ax.set_xlabel("optimizer step (end of each record)")
    ax.set_ylabel("cumulative value (sum of values)")
    ax.set_title("Cumulative value by group over training" if g > 1 or V.group_names is not None
                 else "Cumulative value over training")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="group (final)",
              title_fontsize=8, frameon=False)
    _save_png(fig, path)
    cap = (f"Cumulative value of each group at the end of each of the {h.shape[0]} records "
           f"(steps {int(x[0]) if len(x) else 0} to {int(x[-1]) if len(x) else 0})")
    if rest:
        cap += f"; the {len(shown)} groups with the largest |total| drawn one by one"
    return cap + ". A rising line: the group's samples lowered the validation loss in those steps."


def plot_group_bars(gt, path: str) -> str:
    """Horizontal bars of the group totals (the MAX_BARS largest |total|)."""
    order = torch.argsort(gt.values.abs(), descending=True)[:MAX_BARS].tolist()
    order = sorted(order, key=lambda i: float(gt.values[i]))
    fig = _figure(7.5, 1.2 + 0.32 * len(order))
    ax = fig.add_subplot()
    vals = [float(gt.values[i]) for i in order]
    ax.barh(range(len(order)), vals, color=["#55A868" if v >= 0 else "#C44E52" for v in vals])
    ax.set_yticks(range(len(order)), [_cell(gt.names[i])[:30] for i in order], fontsize=8)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel("sum of values of the group's samples (> 0 = lowered the validation loss)")
    ax.set_title("Value by group")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    _save_png(fig, path)
    cap = "Total value of each group (no history recorded, so no curve over steps)"
    if len(gt) > MAX_BARS:
        cap += f"; the {MAX_BARS} of {len(gt)} groups with the largest |total|"
    return cap + "."


# ---- the report ---------------------------------------------------------------------------------
def _rank_table(V: Values, ids: Tensor, vals: Tensor, texts, groups, names) -> str:
    counts = V.counts[ids]
    head = ["rank", "id", "value", "count", "value / count"] + (["group"] if groups is not None else [])
    if texts is not None:
        head.append("text")
    rows = []
    for r, (i, v, c) in enumerate(zip(ids.tolist(), vals.tolist(), counts.tolist()), 1):
        if groups is not None:
            gid = int(groups[i])
            gname = "" if gid < 0 else (names[gid] if names is not None and gid < len(names)
                                        else str(gid))
        else:
            gname = ""
        row = [r, i, _f(v), c, _f(v / c)] + ([_cell(gname)] if groups is not None else [])
        if texts is not None:
            row.append(_cell(texts.get(i, "")))
        rows.append(row)
    return _table(head, rows)


def _texts_for(texts, ids: list[int]):
    if texts is None:
        return None
    if isinstance(texts, (str, os.PathLike)):
        return load_texts(os.fspath(texts), ids)
    return {i: str(texts[i]) for i in ids if i < len(texts)}


def write_report(V: Values, out_dir: str | os.PathLike, *, top: int = 10, texts=None,
                 groups=None, names=None, source: str | None = None) -> str:
    """Write out_dir/report.md with values_hist.png and groups.png; returns report.md's path.
    groups / names override the stored ones; texts: a file path (see load_texts) or a sequence
    of one text per sample."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if groups is not None:
        groups = groups if isinstance(groups, Tensor) else torch.as_tensor(groups)
    else:
        groups = V.groups
    if names is None and (groups is V.groups or V.groups is None):
        names = V.group_names
    summ = V.summary()
    seen, n = summ["seen"], summ["num_samples"]
    md = io.StringIO()
    w = md.write
    w("# In-Run Data Shapley values: report\n\n")
    if source:
        w(f"Source: `{source}`. ")
    w("A sample's value is the sum over the steps it was trained in of its Shapley share of "
      "the step's drop of the validation loss: **> 0 = it lowered the validation loss "
      "(helpful), < 0 = it raised it**. Seen = appeared in at least one step (count > 0); "
      "never-seen samples have value 0 and are left out of every statistic below.\n\n")
    if V.meta:
        w(_table(["meta", ""], [[_cell(k), _cell(json.dumps(v) if not isinstance(v, str) else v)]
                                for k, v in V.meta.items()]) + "\n\n")

    # summary
    w("## Summary\n\n")
    nan = math.nan
    mean_count = summ["appearances"] / seen if seen else nan
    sd_of_mean = summ["std"] / math.sqrt(seen) if seen else nan
    per_appearance = summ["value_sum"] / summ["appearances"] if summ["appearances"] else nan
    rows = [["steps", "n/a (not recorded)" if V.steps is None else f"{V.steps:,}", ""],
            ["samples", f"{n:,}", ""],
            ["samples seen (count > 0)", f"{seen:,}", f"{_pct(seen / n if n else nan)} of all samples"],
            ["appearances (sum of counts)", f"{summ['appearances']:,}",
             f"{_f(mean_count, 3)} per seen sample"],
            ["sum of values", _f(summ["value_sum"]), "see the efficiency check below"],
            ["mean value of a seen sample", _f(summ["mean"]),
             f"std {_f(summ['std'], 3)}; sd of the mean {_f(sd_of_mean, 3)}"],
            ["mean value per appearance", _f(per_appearance), "sum of values / sum of counts"],
            ["fraction negative (of seen)", _pct(summ["negative_fraction"]),
             "50% if the values were noise symmetric around 0"],
            ["smallest / largest value", f"{_f(summ['min'])} / {_f(summ['max'])}",
             f"{_f((summ['min'] - summ['mean']) / summ['std'], 3)} / "
             f"{_f((summ['max'] - summ['mean']) / summ['std'], 3)} sd from the mean"
             if seen > 1 and summ["std"] > 0 else ""]]
    w(_table(["quantity", "value", "reference"], rows) + "\n\n")
    if not seen:
        w("No sample was seen: nothing to plot or rank.\n\n")

    # distribution
    if seen:
        w("## Distribution of values\n\n")
        cap = plot_histogram(V, os.path.join(out_dir, "values_hist.png"), summ)
        w(f"![histogram of values](values_hist.png)\n\n{cap}\n\n")

    # groups
    gt = None
    if groups is not None:
        gt = V.by_group(groups, names)
    # the history's columns are the groups the engine was built with: given groups must fit them
    hist = V.history is not None and V.history.shape[0] > 0 and (
        groups is None or groups is V.groups or not groups.numel()
        or int(groups.max()) < V.history.shape[1])
    if hist or gt is not None:
        w("## Value by group\n\n" if gt is not None or V.history.shape[1] > 1 else
          "## Value over training\n\n")
        if hist:
            cap = plot_history(V, os.path.join(out_dir, "groups.png"), names)
            w(f"![cumulative value by group](groups.png)\n\n{cap}\n\n")
            if V.history.shape[0]:
                hs = float(V.history.sum())
                w(f"The history's records sum to {_f(hs)} (the sum of all values is "
                  f"{_f(summ['value_sum'])}; they differ where records do not cover every step "
                  "or groups do not cover every sample).\n\n")
        elif gt is not None and len(gt):
            cap = plot_group_bars(gt, os.path.join(out_dir, "groups.png"))
            w(f"![value by group](groups.png)\n\n{cap}\n\n")
        if gt is not None and len(gt):
            w(_group_table(gt, summ) + "\n\n")

    # top and bottom
    if seen and top > 0:
        t_ids, t_vals = V.top(top)
        b_ids, b_vals = V.bottom(top)
        tx = _texts_for(texts, t_ids.tolist() + b_ids.tolist())
        k = t_ids.numel()
        sd_mean = summ["std"] / math.sqrt(k) if k and seen > 1 else math.nan
        for title, ids, vals in ((f"Top {k}: most helpful", t_ids, t_vals),
                                 (f"Bottom {b_ids.numel()}: most harmful", b_ids, b_vals)):
            w(f"## {title}\n\n")
            avg = float(vals.mean()) if vals.numel() else math.nan
            z = (avg - summ["mean"]) / sd_mean if math.isfinite(sd_mean) and sd_mean > 0 else math.nan
            w(_rank_table(V, ids, vals, tx, groups, names) + "\n\n")
            w(f"Their mean value is {_f(avg)}. Reference: {ids.numel()} seen samples drawn at "
              f"random would average {_f(summ['mean'])} ± {_f(sd_mean, 3)} (the mean of all "
              f"{seen:,} seen samples ± one sd of the mean of {ids.numel()})"
              + (f", so these are {_f(z, 3)} sd from it.\n\n" if math.isfinite(z) else ".\n\n"))

    # efficiency
    w("## Efficiency check\n\n")
    w(_efficiency_text(V))
    path = os.path.join(out_dir, "report.md")
    atomic_write(path, lambda f: f.write(md.getvalue().encode("utf-8")))
    return path


def _group_table(gt, summ: dict) -> str:
    order = torch.argsort(gt.values, descending=True).tolist()
    if len(order) > MAX_GROUP_ROWS:
        half = MAX_GROUP_ROWS // 2
        order = order[:half] + [None] + order[-half:]
    mean_seen = gt.mean_seen()
    rows = [["all seen", "", f"{summ['num_samples']:,}", f"{summ['seen']:,}", _f(summ["value_sum"]),
             "100%", _f(summ["mean"]), _pct(summ["negative_fraction"])]]
    total = summ["value_sum"]
    for i in order:
        if i is None:
            rows.append(["…", "", "", "", "", "", "", ""])
            continue
        seen = int(gt.seen[i])
        rows.append([int(gt.ids[i]), _cell(gt.names[i]), f"{int(gt.samples[i]):,}", f"{seen:,}",
                     _f(float(gt.values[i])), _pct(float(gt.values[i]) / total) if total else "n/a",
                     _f(float(mean_seen[i])), _pct(int(gt.negative[i]) / seen if seen else math.nan)])
    head = ["group", "name", "samples", "seen", "sum of values", "share of the sum",
            "mean per seen sample", "negative"]
    return (_table(head, rows) + "\n\nThe first row is the reference: all seen samples. A group "
            "whose mean per seen sample is above it holds, on average, more helpful samples.")


def _efficiency_text(V: Values) -> str:
    eff = V.efficiency()
    span = V.val_loss_span()
    if span is None:
        return ("Not available: these values carry no validation-loss trace (`val_loss` with at "
                f"least two finite entries), so their sum ({_f(eff.value_sum)}) cannot be checked "
                "against the drop of the validation loss.\n")
    a, b = span
    rows = [["sum of all values", _f(eff.value_sum)],
            [f"validation loss drop, val_loss[{a}] - val_loss[{b}]",
             f"{_f(eff.loss_drop)} ({_f(float(V.val_loss[a]))} → {_f(float(V.val_loss[b]))})"],
            ["ratio (1 = the values account for the whole drop)", _f(eff.ratio, 3)]]
    text = _table(["", ""], rows) + "\n\n"
    text += ("Shapley values are efficient: in each step they add up to the step's utility, the "
             "validation loss before the step minus after it. val_loss[t] is the mean validation "
             "loss at the start of step t, so over the run the values should add up to "
             f"val_loss[{a}] - val_loss[{b}], the drop over steps {a} to {b - 1}. ")
    r = eff.ratio
    if math.isfinite(r) and 0.9 <= r <= 1.1:
        text += (f"Here the ratio is {r:.3f}: the values account for the measured change of the "
                 "validation loss to within 10%, so they can be read as shares of it.")
    else:
        text += (f"Here the ratio is {_f(r, 3)}: the values do not add up to the measured change. "
                 "Usual causes: the first-order estimator with large steps (try "
                 "estimator=\"midpoint\"); momentum or weight decay (each step's values sum to "
                 "U(B) - U(empty), the part of the update no sample causes is nobody's); a "
                 "validation batch replaced with set_val during the run; steps outside the "
                 "recorded val_loss span. The ranking of samples can still be informative.")
    if V.steps is not None and V.steps != b - a:
        text += (f" The sum of values covers all {V.steps} steps, the loss drop {b - a} of them; "
                 "with many steps the difference is small.")
    return text + "\n"


# ---- command line -------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m inrun_kernels report",
        description="Markdown report (with PNG plots) of the values of a run. Without VALUES, "
                    "`report [--json ...]` renders benchmarks/RESULTS.md (repository checkout).")
    ap.add_argument("values", metavar="VALUES",
                    help="a Values.save file, or an InRunShapley.save / ValueLedger.save file")
    ap.add_argument("--groups", metavar="FILE",
                    help="one int group id per sample (-1 = none): .npy, .pt/.pth or text, one per line")
    ap.add_argument("--names", metavar="FILE", help="group names: a JSON list (.json) or one per line")
    ap.add_argument("--top", metavar="K", type=int, default=10, help="rows of the top/bottom tables (10)")
    ap.add_argument("--out", metavar="DIR", default=None,
                    help="output folder (default: VALUES without extension + '_report')")
    ap.add_argument("--texts", metavar="FILE",
                    help="one text per sample, .jsonl (a string or {\"text\": ...}) or one per line")
    args = ap.parse_args(argv)
    try:
        V = Values.load(args.values)
        groups = load_groups(args.groups, V.num_samples) if args.groups else None
        names = load_names(args.names) if args.names else None
        out = args.out or os.path.splitext(args.values)[0] + "_report"
        path = write_report(V, out, top=args.top, texts=args.texts, groups=groups, names=names,
                            source=os.path.basename(args.values))
    except (OSError, ValueError, TypeError, ImportError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


__all__ = ["write_report", "load_groups", "load_names", "load_texts", "main"]
