"""LM demo: In-Run values flag corrupted documents, and dropping the negatively valued ones
trains faster (the paper's data-curation case study, at CPU scale).

    python -m inrun_kernels demo lm [--quick] [--out DIR]

Corpus: paragraphs of the Python standard library's own documentation (pydoc topics and module,
class and function docstrings; on every machine, no download), one document per paragraph,
bytes as tokens. A known fraction of training documents is corrupted the ways the paper found
low-value data: whitespace only, random symbols and numbers, shuffled words, exact duplicates of
another training document. A small randomly initialised GPT-2 (transformers) trains with AdamW
while InRunShapley records every document's value against a held-out clean validation set.

Reported: detection AUROC of the corrupted documents by low value, next to the scores a user
would try first (final per-sample training loss, loss summed over training, per-sample gradient
norm; each in the direction that flags corruption best), per corruption kind; then the curation
experiment: retrain from the same initialisation (a) on all documents, (b) without the
negatively valued ones, (c) without as many random ones (each averaged over 3 data orders), and
the steps each needs to reach the test loss (a) ends at. Writes the values (ik.Values) and a plot of the three loss curves."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import re
import time
import warnings

import torch

from .demo import auroc
from .hf import causal_lm_loss
from .shapley import InRunShapley

PAD = 256            # byte tokens 0..255, one pad id
KINDS = ("whitespace", "symbols", "shuffled", "duplicate")
MODULES = ("json collections itertools functools os re string textwrap datetime decimal fractions "
           "statistics random heapq bisect pathlib typing enum dataclasses argparse logging csv "
           "shutil subprocess threading queue socket email.message http.client urllib.parse base64 "
           "hashlib hmac struct array copy pickle pprint difflib unittest doctest inspect ast "
           "tokenize contextlib abc numbers math cmath operator io tempfile glob fnmatch zipfile "
           "tarfile gzip sqlite3 calendar time locale gettext codecs unicodedata weakref gc "
           "traceback warnings asyncio selectors signal sched uuid secrets ipaddress mimetypes "
           "configparser shlex cmd getopt optparse timeit trace").split()


def corpus(min_chars: int = 48) -> list[str]:
    """Paragraphs of the standard library's documentation, whitespace-normalised, ASCII,
    deduplicated, in a fixed order."""
    texts = []
    with contextlib.suppress(ImportError):
        from pydoc_data.topics import topics
        texts += [topics[k] for k in sorted(topics)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for attr in [None] + sorted(a for a in dir(mod) if not a.startswith("_")):
                obj = mod if attr is None else getattr(mod, attr, None)
                doc = getattr(obj, "__doc__", None)
                if isinstance(doc, str) and (obj is mod or getattr(obj, "__module__", None) == mod.__name__):
                    texts.append(doc)
    paras = set()
    for t in texts:
        for p in re.split(r"\n\s*\n", t):
            p = " ".join(p.split())
            if len(p) >= min_chars and p.isascii():
                paras.add(p)
    if len(paras) < 500:
        raise RuntimeError("too little documentation text in this Python (run without -OO)")
    return sorted(paras)


def corrupt(docs: list[str], frac: float, rng: random.Random) -> tuple[list[str], list[str | None]]:
    """Corrupt `frac` of the documents, the kinds in equal shares; returns (docs, kind per doc)."""
    docs, kinds = list(docs), [None] * len(docs)
    bad = rng.sample(range(len(docs)), int(frac * len(docs)))
    clean = [i for i in range(len(docs)) if i not in set(bad)]
    for j, i in enumerate(bad):
        kind = KINDS[j % len(KINDS)]
        n = len(docs[i])
        if kind == "whitespace":
            docs[i] = "".join(rng.choice(" \n\t") for _ in range(rng.randint(8, n)))
        elif kind == "symbols":
            docs[i] = "".join(rng.choice("0123456789#$%&*+-/<=>@^_|~!?") for _ in range(n))
        elif kind == "shuffled":
            words = docs[i].split()
            rng.shuffle(words)
            docs[i] = " ".join(words)
        else:   # an exact copy of another (clean) training document
            docs[i] = docs[rng.choice(clean)]
        kinds[i] = kind
    return docs, kinds


def encode(docs: list[str], T: int) -> dict[str, torch.Tensor]:
    """Bytes as tokens, right-padded / cut to T; labels -100 on padding."""
    ids = torch.full((len(docs), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(docs), T, dtype=torch.long)
    for r, d in enumerate(docs):
        b = list(d.encode()[:T])
        ids[r, :len(b)] = torch.tensor(b, dtype=torch.long)
        mask[r, :len(b)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def rows(data: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in data.items()}


def make_model(T: int, d: int, layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    conf = GPT2Config(vocab_size=PAD + 1, n_positions=T, n_embd=d, n_layer=layers, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(conf)
    model.config.use_cache = False
    return model


def _bar(total: int, desc: str, quiet: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:   # progress bars are optional
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


def _mean_loss(model, data: dict, bs: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        out = torch.cat([causal_lm_loss(model, rows(data, torch.arange(i, min(i + bs, len(data["labels"])))))
                         for i in range(0, len(data["labels"]), bs)])
    model.train()
    return float(out.mean())


def train_values(cfg, train, val, kinds, seed, quiet):
    """One training run with InRunShapley (values summed per corruption kind every 10 steps);
    also the baselines' raw material."""
    n = len(train["labels"])
    model = make_model(cfg.T, cfg.d, cfg.layers, seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    groups = torch.tensor([0 if k is None else 1 + KINDS.index(k) for k in kinds])
    eng = InRunShapley(model, opt, causal_lm_loss, val, num_samples=n, estimator=cfg.estimator,
                       groups=groups, group_names=("clean",) + KINDS, history_every=10)
    loss_sum = torch.zeros(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    t_eng = 0.0
    steps = cfg.epochs * ((n + cfg.batch - 1) // cfg.batch)
    with _bar(steps, "training with InRunShapley", quiet) as bar:
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=g)
            for i in range(0, n, cfg.batch):
                ids = order[i:i + cfg.batch]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                eng.step(rows(train, ids), ids)
                opt.step()
                t_eng += time.perf_counter() - t0
                loss_sum[ids] += eng.last_losses.double()
                if bar is not None:
                    bar.update(1)
    import inrun_kernels as ik
    final = torch.cat([causal_lm_loss(model, rows(train, torch.arange(i, min(i + 256, n)))).detach()
                       for i in range(0, n, 256)]).double()
    norms = torch.cat([ik.grad_norms(model, causal_lm_loss, rows(train, torch.arange(i, min(i + 64, n))))
                       for i in range(0, n, 64)]).double()
    return eng, init, {"final loss": final, "summed loss": loss_sum, "gradient norm": norms}, t_eng


def plain_run(cfg, init, train, keep: torch.Tensor, test, steps: int, seed: int, quiet, desc):
    """Plain AdamW training on the documents `keep`, the same initialisation and schedule;
    test loss every cfg.eval_every steps."""
    model = make_model(cfg.T, cfg.d, cfg.layers, seed)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 2)
    curve, step = [(0, _mean_loss(model, test))], 0
    t = 0.0
    with _bar(steps, desc, quiet) as bar:
        while step < steps:
            order = keep[torch.randperm(len(keep), generator=g)]
            for i in range(0, len(order), cfg.batch):
                if step == steps:
                    break
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                causal_lm_loss(model, rows(train, order[i:i + cfg.batch])).mean().backward()
                opt.step()
                t += time.perf_counter() - t0
                step += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.eval_every == 0 or step == steps:
                    curve.append((step, _mean_loss(model, test)))
    return curve, t / steps


def steps_to(curve, target: float) -> int | None:
    for s, loss in curve:
        if loss <= target:
            return s
    return None


class Config(argparse.Namespace):
    pass


def settings(quick: bool) -> Config:
    c = Config()
    c.T, c.d, c.layers, c.batch, c.lr, c.estimator = 64, 64, 2, 16, 3e-3, "first"
    c.n_train, c.n_val, c.n_test, c.frac = (240, 32, 64, 0.2) if quick else (2400, 32, 256, 0.2)
    c.epochs, c.eval_every = (2, 5) if quick else (2, 10)
    c.orders = 1 if quick else 3   # data orders each retraining is averaged over
    return c


def run(quick: bool = False, seed: int = 0, out: str | None = None, quiet: bool = False,
        threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    cfg = settings(quick)
    rng = random.Random(seed)
    docs = corpus()
    rng.shuffle(docs)
    need = cfg.n_train + cfg.n_val + cfg.n_test
    train_docs, kinds = corrupt(docs[:cfg.n_train], cfg.frac, rng)
    val_docs, test_docs = docs[cfg.n_train:cfg.n_train + cfg.n_val], docs[cfg.n_train + cfg.n_val:need]
    train, val, test = encode(train_docs, cfg.T), encode(val_docs, cfg.T), encode(test_docs, cfg.T)
    bad = torch.tensor([k is not None for k in kinds])

    eng, init, base, t_eng = train_values(cfg, train, val, kinds, seed, quiet)
    values = eng.values
    scores = {"In-Run value (low = suspect)": -values}
    for name, s in base.items():   # a baseline is taken in whichever direction flags better
        scores[name] = s if auroc(s, bad) >= auroc(-s, bad) else -s
    table = {name: {"all": auroc(s, bad), **{k: auroc(s[[kk in (None, k) for kk in kinds]],
                                                      bad[[kk in (None, k) for kk in kinds]])
                                              for k in KINDS}}
             for name, s in scores.items()}
    # curation: (a) all, (b) without negatively valued, (c) without as many random documents
    n = cfg.n_train
    negative = values < 0
    steps = cfg.epochs * ((n + cfg.batch - 1) // cfg.batch)
    keep_b = (~negative).nonzero().flatten()
    drop = int(negative.sum())
    keep_c = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 3))[drop:].sort().values
    curves, t_plain = {}, None
    for name, keep in (("(a) all documents", torch.arange(n)),
                       (f"(b) without the {drop} negatively valued", keep_b),
                       (f"(c) without {drop} random documents", keep_c)):
        # the mean test-loss curve over cfg.orders data orders: one order's curve is noisy
        runs = []
        for r in range(cfg.orders):
            c, t = plain_run(cfg, init, train, keep, test, steps, seed + 10 * r, quiet,
                             f"{name} (order {r + 1}/{cfg.orders})")
            runs.append(c)
            t_plain = t if t_plain is None else t_plain
        curves[name] = [(s, sum(c[j][1] for c in runs) / len(runs)) for j, (s, _) in enumerate(runs[0])]
    target = curves["(a) all documents"][-1][1]
    reach = {name: steps_to(c, target) for name, c in curves.items()}
    result = {"auroc": table, "negative_fraction": float(negative.float().mean()),
              "corrupt_fraction_of_negative": float(bad[negative].float().mean()) if drop else float("nan"),
              "corrupt_fraction": float(bad.float().mean()), "target_loss": target, "steps": steps,
              "reach": reach, "curves": curves, "orders": cfg.orders, "step_ratio": (t_eng / eng.steps) / t_plain,
              "n_train": n, "n_val": cfg.n_val, "n_test": cfg.n_test, "engine_steps": eng.steps,
              "values_sum": float(values.sum()),
              "val_loss_drop": float(eng.val_loss[0] - _mean_loss(eng.model, val))}
    if out:
        os.makedirs(out, exist_ok=True)
        result["plot"] = _plot(curves, target, os.path.join(out, "curation.png"))
        res = eng.results()
        res.save(os.path.join(out, "values"))
        result["values_file"] = os.path.join(out, "values")
        with open(os.path.join(out, "texts.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in train_docs)
        result["report"] = res.report(os.path.join(out, "report"), top=10, texts=train_docs)
    return result


def _plot(curves, target, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in curves.items():
        ax.plot([s for s, _ in c], [v for _, v in c], label=name, lw=1.8)
    ax.axhline(target, color="grey", ls=":", lw=1, label="target: final test loss of (a)")
    ax.set_xlabel("training step")
    ax.set_ylabel("test loss (clean held-out documents)")
    ax.set_title("Retraining after curation by In-Run values")
    lo = min(v for c in curves.values() for _, v in c)
    early = max(c[min(2, len(c) - 1)][1] for c in curves.values())   # zoom past the first drop
    ax.set_ylim(lo - 0.05, max(early, target + 0.1) + 0.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m inrun_kernels demo lm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small form (CI, under a minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="inrun_demo_lm", help="folder for the plot and the values")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    r = run(quick=a.quick, seed=a.seed, out=a.out, quiet=a.quiet, threads=a.threads)
    print(f"LM demo: GPT-2 ({'quick' if a.quick else 'full'}) on {r['n_train']} standard-library "
          f"documents ({r['corrupt_fraction']:.0%} corrupted: {', '.join(KINDS)}), {r['n_val']} clean "
          f"validation, {r['n_test']} clean test documents; {r['engine_steps']} AdamW steps")
    print("\ndetection AUROC of corrupted documents (0.5 = chance)")
    print(f"  {'score':<30}{'all':>7}" + "".join(f"{k:>12}" for k in KINDS))
    for name, row in r["auroc"].items():
        print(f"  {name:<30}{row['all']:>7.3f}" + "".join(f"{row[k]:>12.3f}" for k in KINDS))
    print(f"\nnegatively valued: {r['negative_fraction']:.1%} of documents "
          f"({r['corrupt_fraction_of_negative']:.0%} of them corrupted; {r['corrupt_fraction']:.0%} of all)")
    print(f"sum of values {r['values_sum']:+.4f} vs validation loss drop over training "
          f"{r['val_loss_drop']:+.4f} (efficiency check)")
    print(f"\ncuration: steps to reach the test loss (a) ends at ({r['target_loss']:.4f}), out of "
          f"{r['steps']} (mean test-loss curve over {r['orders']} data order(s)); final test loss")
    for name, s in r["reach"].items():
        print(f"  {name:<44} {'not reached' if s is None else s:>11}   {r['curves'][name][-1][1]:.4f}")
    print(f"\nengine step {r['step_ratio']:.2f}x a plain step of the same model")
    if r.get("plot"):
        print(f"plot: {r['plot']}; values: {r['values_file']}; report: {r['report']}")
    print(f"({time.perf_counter() - t0:.0f} s)")
