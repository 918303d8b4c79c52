"""Fidelity of the In-Run estimators against exact Shapley values of the real step.

    python -m benchmarks.fidelity [--quick] [--out benchmarks/results/fidelity.json]
                                  [--results-md benchmarks/RESULTS.md | --no-results-md]

For each model and step size, 3 training batches of N=10 samples; for each batch
`ik.fidelity_check` enumerates all 2^10 subsets S of the batch, the real one-step utility
U(S) = L_val(w) - L_val(w + Delta(g_S)) (Delta: the optimizer's update map, state fixed) and
its exact Shapley values, and compares every estimator/update's In-Run values with them
(Spearman, Pearson, relative error ||phi - exact|| / ||exact||), mean and worst over the batches.

Models (float64, no download, real data):
  mlp    an MLP 64-64-10 (tanh) on scikit-learn's digits, trained briefly with AdamW
  gpt2   GPT-2 from a GPT2Config (n_layer 2, n_embd 64, n_head 2, eager attention, dropout 0,
         random init), byte-level tokens (vocab 256), T = 32, on the docstrings of Python's
         standard library (pydoc_data.topics; validation from other topics), pre-trained with
         AdamW for a few hundred steps; loss ik.causal_lm_loss on {"input_ids", "labels"}
Cases:
  sgd     plain SGD at the learning rate that makes the real full-batch step lower L_val by
          0.01%, 0.1%, 1%, 10% (bisection per batch). Batches: the first 3 of 30 random candidate
          batches (fixed seed) whose one step can lower L_val that much at all (a step on 10
          rows of a pre-trained LM rarely lowers L_val by more than ~1%: such targets are
          reported as not reachable)
  adamw   AdamW with its pre-training state at the training lr and at 10x it (drop reported)
Estimators reported: first/sgd (the paper's value), first/optimizer (secant), midpoint/optimizer,
second/optimizer. `vs ref` = the largest relative difference between the engine's values and the
same estimators computed independently from their definitions (torch.func, no engine).

--quick: the MLP only, one batch, SGD at 0.1% and 1% (about a minute on 2 cores); it does not
touch RESULTS.md unless --results-md is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import inrun_kernels as ik  # noqa: E402
from inrun_kernels import fidelity as fid  # noqa: E402
from benchmarks.common import env_info, hardware_line  # noqa: E402

BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"
N = 10
SGD_DROPS = (1e-4, 1e-3, 1e-2, 1e-1)
QUICK_DROPS = (1e-3, 1e-2)
REPORTED = ("first/sgd", "first/optimizer", "midpoint/optimizer", "second/optimizer")
DTYPE = torch.float64


# ---- models and data ----------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=64, classes=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def ce_loss(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


class Setup:
    """A trained model, its AdamW (with state), the training pool, validation rows, the loss."""

    def __init__(self, name: str, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable,
                 pool: Any, val: Any, info: dict):
        self.name, self.model, self.opt, self.loss_fn = name, model, opt, loss_fn
        self.pool, self.val, self.info = pool, val, info

    def rows(self, idx: Tensor):
        return fid._rows(self.pool, idx)

    @property
    def pool_size(self) -> int:
        from inrun_kernels.batch import batch_size
        return batch_size(self.pool, "pool")


def build_mlp(seed: int = 0, steps: int = 40, lr: float = 3e-3, M: int = 16) -> Setup:
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=DTYPE)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X, y = X[perm], y[perm]
    n_tr = 1400
    mu, sd = X[:n_tr].mean(0), X[:n_tr].std(0).clamp_min(1e-3)
    X = (X - mu) / sd
    torch.manual_seed(seed)
    model = MLP().to(DTYPE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for s in range(steps):
        idx = torch.randint(0, n_tr, (64,), generator=g)
        opt.zero_grad()
        loss = ce_loss(model, (X[idx], y[idx])).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    val = (X[n_tr:n_tr + M], y[n_tr:n_tr + M])
    with torch.no_grad():
        acc = float((model(X[n_tr:]).argmax(1) == y[n_tr:]).double().mean())
    info = {"model": "MLP 64-64-10 tanh", "data": "sklearn digits (standardised), 1400 train rows",
            "params": sum(p.numel() for p in model.parameters()), "pretrain": f"AdamW lr {lr}, wd 0.01, "
            f"{steps} steps of 64", "train_loss_end": sum(losses[-10:]) / 10, "heldout_acc": acc, "M": M,
            "lr_train": lr}
    return Setup("mlp", model, opt, ce_loss, (X[:n_tr], y[:n_tr]), val, info)


def stdlib_text() -> tuple[bytes, bytes]:
    """Real English/technical text present in every CPython install: the pydoc topics. Every 5th
    topic (sorted) is held out for validation."""
    from pydoc_data.topics import topics
    keys = sorted(topics)
    train = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 != 4)
    val = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 5 == 4)
    return train.encode("utf-8"), val.encode("utf-8")


def _chunks(data: bytes, T: int) -> Tensor:
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = t.numel() // T
    return t[:n * T].view(n, T)


def build_gpt2(seed: int = 0, steps: int = 400, lr: float = 3e-3, T: int = 32, M: int = 8,
               batch: int = 16, activation: str = "gelu", val_from: str = "topics") -> Setup:
    """Pre-trained in float32 (faster), then the model and the AdamW state in float64."""
    import contextlib

    from transformers import GPT2Config, GPT2LMHeadModel
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        conf = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                          eos_token_id=0, pad_token_id=None, activation_function=activation)
        conf._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(conf)
    model.config.use_cache = False
    model = model.float().train()
    tr, va = stdlib_text()
    pool, vrows = _chunks(tr, T), _chunks(va, T)
    g = torch.Generator().manual_seed(seed)
    if val_from == "rows":      # held-out rows of the training topics
        perm = torch.randperm(len(pool), generator=g)
        vrows, pool = pool[perm[:1000]], pool[perm[1000:]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for s in range(steps):
        ids = pool[torch.randint(0, len(pool), (batch,), generator=g)]
        opt.zero_grad()
        loss = ik.causal_lm_loss(model, {"input_ids": ids, "labels": ids}).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    model.to(DTYPE)               # same Parameter objects: the optimizer still holds them
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and v.is_floating_point() and k != "step":
                st[k] = v.to(DTYPE)
    vsel = vrows[torch.randperm(len(vrows), generator=g)[:M]]
    val = {"input_ids": vsel, "labels": vsel.clone()}
    info = {"model": f"GPT-2 n_layer 2, n_embd 64, n_head 2, {activation}, eager attention, dropout 0, random init",
            "data": f"pydoc_data.topics bytes (vocab 256), T={T}, {len(pool)} train / {len(vrows)} val rows "
                    f"({'held-out topics' if val_from == 'topics' else 'held-out rows'})",
            "params": sum(p.numel() for p in model.parameters()),
            "pretrain": f"AdamW lr {lr}, wd 0.01, {steps} steps of {batch} (float32, then float64)",
            "train_loss_start": sum(losses[:10]) / 10, "train_loss_end": sum(losses[-10:]) / 10,
            "M": M, "lr_train": lr}
    return Setup("gpt2", model, opt, ik.causal_lm_loss, {"input_ids": pool, "labels": pool}, val, info)


# ---- step sizes -----------------------------------------------------------------------------------
class Candidate:
    """A candidate training batch and drop(lr), the relative decrease of L_val by one plain SGD
    step at lr on its N rows (g_bar from one backward; L_val by functional_call)."""

    def __init__(self, setup: Setup, k: int, idx: Tensor):
        import copy
        self.k, self.idx = k, idx
        m = copy.deepcopy(setup.model)
        for p in m.parameters():
            p.grad = None
        names = [nm for nm, p in m.named_parameters() if p.requires_grad]
        params = [p for p in m.parameters() if p.requires_grad]
        gs = torch.autograd.grad(setup.loss_fn(m, setup.rows(idx)).mean(), params, allow_unused=True)
        self.g = {nm: g.detach() for nm, g in zip(names, gs) if g is not None}
        self.w = {nm: p.detach() for nm, p in m.named_parameters()}
        self.m, self.val, self.wrap = m, setup.val, fid._LossOf(m, setup.loss_fn)
        self.base = self.loss_at(0.0)
        with torch.enable_grad():
            gv = torch.autograd.grad(setup.loss_fn(m, setup.val).mean(), params, allow_unused=True)
        self.align = sum(float((self.g[nm] * v).sum()) for nm, v in zip(names, gv) if v is not None and nm in self.g)
        self.best, self.best_lr = self._scan()

    def loss_at(self, lr: float) -> float:
        prm = {"model." + nm: (w - lr * self.g[nm] if nm in self.g else w) for nm, w in self.w.items()}
        with torch.no_grad():
            return float(torch.func.functional_call(self.wrap, prm, (self.val,), tie_weights=True,
                                                    strict=False).mean())

    def drop(self, lr: float) -> float:
        return (self.base - self.loss_at(lr)) / self.base

    def _scan(self) -> tuple[float, float]:
        """The largest drop along the ray (doubling lr from the first-order 0.01% step)."""
        if self.align <= 0:
            return float("-inf"), 0.0
        lr = 1e-4 * self.base / self.align
        best, best_lr = self.drop(lr), lr
        for _ in range(40):
            d = self.drop(lr * 2)
            if d < best:
                break
            lr, best, best_lr = lr * 2, d, lr * 2
        return best, best_lr


def lr_for_drop(c: Candidate, target: float, rtol: float = 1e-3) -> tuple[float, float]:
    """The lr whose real SGD step lowers L_val by `target` (relative): bisection in log lr
    between 0 and the best point of the ray (the caller checks c.best >= target)."""
    lo, hi = 0.0, c.best_lr
    d = float("nan")
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        d = c.drop(mid)
        if abs(d - target) <= rtol * target:
            return mid, d
        if d < target:
            lo = mid
        else:
            hi = mid
    return mid, d


# ---- cases --------------------------------------------------------------------------------------
def _stats(xs: list[float], worst: str) -> dict:
    xs = [x for x in xs if x == x]
    if not xs:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "worst": float("nan")}
    d = {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}
    d["worst"] = d[worst]
    return d


def summarise(reports: list[dict]) -> dict:
    keys = sorted({k for r in reports for k in r["metrics"]})
    out = {}
    for k in keys:
        ms = [r["metrics"][k] for r in reports if k in r["metrics"]]
        out[k] = {"spearman": _stats([m["spearman"] for m in ms], "min"),
                  "pearson": _stats([m["pearson"] for m in ms], "min"),
                  "rel_err": _stats([m["rel_err"] for m in ms], "max"),
                  "vs_ref": max((r["engine_vs_reference"].get(k, float("nan")) for r in reports), default=float("nan"))}
    return out


def run_model(setup: Setup, drops, n_batches: int, adamw: bool, log, max_candidates: int = 30) -> list[dict]:
    """SGD: per target drop, the first n_batches candidate batches (fixed random order) whose
    step can lower L_val by the target. AdamW: the first n_batches candidates."""
    g = torch.Generator().manual_seed(1000)
    t0 = time.perf_counter()
    cands = [Candidate(setup, k, torch.randperm(setup.pool_size, generator=g)[:N]) for k in range(max_candidates)]
    log(f"[{setup.name}] {len(cands)} candidate batches scanned in {time.perf_counter() - t0:.1f}s; best one-step "
        f"drops (%): {[round(100 * c.best, 3) for c in cands]}")
    cases = []
    for target in drops:
        t0 = time.perf_counter()
        chosen = [c for c in cands if c.best >= target * 1.01][:n_batches]
        reps, lrs = [], []
        for c in chosen:
            lr, _ = lr_for_drop(c, target)
            opt = torch.optim.SGD(setup.model.parameters(), lr=lr)
            rep = fid.fidelity_check(setup.model, opt, setup.loss_fn, setup.rows(c.idx), setup.val, n=N,
                                     reference=True, on_error="record")
            reps.append(rep.to_dict())
            lrs.append(lr)
        case = {"model": setup.name, "optimizer": "SGD", "target_drop": target, "lrs": lrs,
                "batches": [c.k for c in chosen], "best_drop_any": max(c.best for c in cands),
                "reports": reps, "summary": summarise(reps), "drops": [r["drop"] for r in reps],
                "seconds": time.perf_counter() - t0}
        cases.append(case)
        log(_case_line(case))
    if adamw:
        lr0 = float(setup.opt.param_groups[0]["lr"])
        for mult in (1.0, 10.0):
            t0 = time.perf_counter()
            opt = fid.copy_optimizer(setup.opt, setup.model, setup.model)
            for grp in opt.param_groups:
                grp["lr"] = float(grp["lr"]) * mult
            reps = []
            for c in cands[:n_batches]:
                rep = fid.fidelity_check(setup.model, opt, setup.loss_fn, setup.rows(c.idx), setup.val, n=N,
                                         reference=True, on_error="record")
                reps.append(rep.to_dict())
            case = {"model": setup.name, "optimizer": "AdamW", "lr_mult": mult, "lrs": [lr0 * mult] * len(reps),
                    "batches": [c.k for c in cands[:n_batches]], "reports": reps, "summary": summarise(reps),
                    "drops": [r["drop"] for r in reps], "seconds": time.perf_counter() - t0}
            cases.append(case)
            log(_case_line(case))
    return cases


def _case_name(c: dict) -> str:
    if c["optimizer"] == "SGD":
        return f"SGD, {100 * c['target_drop']:g}% step"
    mult = c["lr_mult"]
    return "AdamW, training lr" if mult == 1 else f"AdamW, {mult:g}x training lr"


def _case_line(c: dict) -> str:
    s = c["summary"]
    parts = [f"  {c['model']:<5} {_case_name(c):<26} batches {c['batches']} "
             f"drop {_pct(c['drops'])} {c['seconds']:.1f}s"]
    for k in REPORTED:
        if k in s:
            parts.append(f"    {k:<20} sp {s[k]['spearman']['mean']:.4f} pe {s[k]['pearson']['mean']:.4f} "
                         f"err {_g(s[k]['rel_err']['mean'])} (vs ref {s[k]['vs_ref']:.0e})")
    errs = {k: v for r in c["reports"] for k, v in r["errors"].items()}
    for k, v in errs.items():
        parts.append(f"    {k}: FAILED {v}")
    return "\n".join(parts)


def _g(x: float) -> str:
    """A relative error: 4 decimals from 0.001 up, else 2 significant digits."""
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _pct(xs) -> str:
    xs = list(xs)
    if not xs:
        return "-"
    lo, hi = f"{100 * min(xs):.3g}", f"{100 * max(xs):.3g}"
    return f"{lo}%" if lo == hi else f"{lo} to {hi}%"


def _lrs(xs) -> str:
    xs = list(xs)
    if not xs:
        return "-"
    lo, hi = f"{min(xs):.2g}", f"{max(xs):.2g}"
    return lo if lo == hi else f"{lo} to {hi}"


# ---- targets ------------------------------------------------------------------------------------
def targets(cases: list[dict]) -> list[dict]:
    """The issue's targets, judged on the mean over batches (and the worst batch where stated)."""
    out = []

    def add(case, key, label, ok, measured):
        out.append({"model": case["model"], "case": _case_name(case), "estimator": key, "target": label,
                    "measured": measured, "met": bool(ok)})

    for c in cases:
        s = c["summary"]
        if c["model"] == "gpt2" and c["optimizer"] == "SGD" and c["target_drop"] in (1e-3, 1e-2) and c["reports"]:
            m = s.get("midpoint/optimizer")
            if m:
                add(c, "midpoint/optimizer", "rel. err <= 0.03 and Spearman >= 0.99",
                    m["rel_err"]["mean"] <= 0.03 and m["spearman"]["mean"] >= 0.99,
                    f"err {_g(m['rel_err']['mean'])}, Spearman {m['spearman']['mean']:.4f}")
            m = s.get("second/optimizer")
            if m:
                add(c, "second/optimizer", "rel. err <= 0.06", m["rel_err"]["mean"] <= 0.06,
                    f"err {_g(m['rel_err']['mean'])}")
        if c["optimizer"] == "AdamW" and c["lr_mult"] == 1.0 and c["reports"]:
            m = s.get("first/optimizer")
            if m:
                add(c, "first/optimizer", "Pearson >= 0.98 (min >= 0.95)",
                    m["pearson"]["mean"] >= 0.98 and m["pearson"]["min"] >= 0.95,
                    f"Pearson {m['pearson']['mean']:.4f} (min {m['pearson']['min']:.4f})")
            m = s.get("midpoint/optimizer")
            if m:
                add(c, "midpoint/optimizer", "Pearson >= 0.999", m["pearson"]["mean"] >= 0.999,
                    f"Pearson {m['pearson']['mean']:.4f} (min {m['pearson']['min']:.4f})")
    return out


# ---- report -------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    env = res["env"]
    h = env["hardware"]
    L = [f"## Fidelity of the estimators (`python -m benchmarks.fidelity`{' --quick' if res['quick'] else ''})", "",
         f"Run `{res['out']}` ({res['date']}, {res['seconds']:.0f} s). Hardware: {hardware_line(env)}."
         + (f" Load average at start {h['loadavg_at_start'][0]:.2f}" if h.get("loadavg_at_start") else "")
         + (f", at end {res['loadavg_at_end'][0]:.2f} on {h['cores']} cores (a loaded machine slows this "
            "run; the fidelity numbers themselves are deterministic)." if res.get("loadavg_at_end") else "."), "",
         "Ground truth: exact Shapley values of the real one-step utility U(S) = L_val(w) - "
         "L_val(w + Delta(g_S)), all 2^10 subsets of each batch of N=10, float64 "
         "(`ik.fidelity_check`). Delta = the optimizer's update map with its state fixed. "
         "Per case: mean over the batches, worst batch in brackets (min for correlations, max for "
         "the error); rel. err = ||phi - exact|| / ||exact||. drop = relative decrease of L_val by "
         "the full step. vs ref = engine vs the same estimator computed from its definition "
         "without the engine (largest relative difference).", ""]
    for name, info in res["models"].items():
        L.append(f"- **{name}**: {info['model']}; {info['data']}; {info['params']} parameters; pre-trained "
                 f"{info['pretrain']} (final train loss {info['train_loss_end']:.3f}); "
                 f"M = {info['M']} validation rows.")
    L += ["", "| model | case | lr | drop | estimator | Spearman | Pearson | rel. err | vs ref |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        s = c["summary"]
        head = f"| {c['model']} | {_case_name(c)} | {_lrs(c['lrs'])} | {_pct(c['drops'])}"
        if not c["reports"]:
            L.append(f"{head} | - | not reachable: no candidate batch's one SGD step lowers L_val by that "
                     f"much (best {100 * c['best_drop_any']:.3g}%) | | | |")
            continue
        if len(c["reports"]) < res["n_batches"]:
            head += f" ({len(c['reports'])} batch(es) reach it)"
        for k in REPORTED:
            if k not in s:
                continue
            m = s[k]
            L.append(f"{head} | {k} | {m['spearman']['mean']:.4f} ({m['spearman']['min']:.4f}) | "
                     f"{m['pearson']['mean']:.4f} ({m['pearson']['min']:.4f}) | "
                     f"{_g(m['rel_err']['mean'])} ({_g(m['rel_err']['max'])}) | {m['vs_ref']:.0e} |")
            head = "| | | |"
        errs = {k: v for r in c["reports"] for k, v in r["errors"].items()}
        for k, v in errs.items():
            L.append(f"| | | | | {k} | failed: {v[:120]} | | | |")
    L += ["", "Targets (issue 8; judged on the mean over batches):", "",
          "| model | case | estimator | target | measured | |", "|---|---|---|---|---|---|"]
    for t in res["targets"]:
        L.append(f"| {t['model']} | {t['case']} | {t['estimator']} | {t['target']} | {t['measured']} | "
                 f"{'**met**' if t['met'] else '**missed**'} |")
    if not res["targets"]:
        L.append("| | | | (no targeted case in this run) | | |")
    return "\n".join(L) + "\n"


def write_results_md(path: str, section: str) -> None:
    block = f"{BEGIN}\n{section}{END}\n"
    text = open(path).read() if os.path.exists(path) else ""
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        a = text.index(BEGIN)
        b = text.index(END) + len(END)
        if text[b:b + 1] == "\n":
            b += 1
        text = text[:a] + block + text[b:]
    else:
        text = text + ("" if text.endswith("\n") or not text else "\n") + ("\n" if text else "") + block
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MLP only, one batch, SGD at 0.1%% and 1%%")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/fidelity.json, "
                                                "fidelity_quick.json with --quick)")
    ap.add_argument("--md", default=None, help="also write the Markdown section to this file")
    ap.add_argument("--results-md", default=None, help="RESULTS.md whose fidelity section is rewritten "
                                                       "(default benchmarks/RESULTS.md; not with --quick)")
    ap.add_argument("--no-results-md", action="store_true")
    ap.add_argument("--models", default=None, help="comma list of mlp,gpt2")
    ap.add_argument("--batches", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    quick = args.quick
    out = args.out or os.path.join(HERE, "results", "fidelity_quick.json" if quick else "fidelity.json")
    models = (args.models or ("mlp" if quick else "mlp,gpt2")).split(",")
    n_batches = args.batches or (1 if quick else 3)
    drops = QUICK_DROPS if quick else SGD_DROPS
    env = env_info()
    log = lambda s: print(s, flush=True)  # noqa: E731
    res = {"quick": quick, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000"),
           "out": os.path.relpath(out, REPO), "env": env, "N": N, "n_batches": n_batches, "models": {},
           "cases": []}
    for name in models:
        ts = time.perf_counter()
        setup = {"mlp": build_mlp, "gpt2": build_gpt2}[name]()
        setup.info["setup_seconds"] = time.perf_counter() - ts
        res["models"][name] = setup.info
        log(f"[{name}] built in {setup.info['setup_seconds']:.1f}s: {setup.info}")
        res["cases"] += run_model(setup, drops, n_batches, adamw=not quick, log=log,
                                  max_candidates=10 if quick else 30)
    res["targets"] = targets(res["cases"])
    try:
        res["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    res["seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    results_md = args.results_md or (None if quick else os.path.join(HERE, "RESULTS.md"))
    if results_md and not args.no_results_md:
        write_results_md(results_md, md)
        log(f"wrote the fidelity section of {results_md}")
    log(f"wrote {out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
