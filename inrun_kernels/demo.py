"""Demo: find flipped labels in scikit-learn's digits from one training run.

Trains a small MLP on the 8x8 digits (they ship inside scikit-learn: nothing is downloaded)
with a fraction of training labels flipped, records first-order In-Run Data Shapley values
with InRunShapley, and reports how well a low value flags a flipped label (AUROC) and the time
per step relative to plain training of an identical model on the same batches."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from .ops import resolve_backend
from .shapley import InRunShapley


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def load_digits_split(n_train: int, n_val: int, flip: float, seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 0.1
    x = (x - mean) / std
    y_train = y[tr].clone()
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=g)[: int(flip * n_train)]] = True
    shift = torch.randint(1, 10, (int(flipped.sum()),), generator=g)
    y_train[flipped] = (y_train[flipped] + shift) % 10   # always a different class
    return (x[tr], y_train, flipped), (x[va], y[va]), (x[te], y[te])


def per_sample_ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def run(epochs: int = 6, batch_size: int = 32, flip: float = 0.1, n_train: int = 1000,
        n_val: int = 200, lr: float = 0.05, seed: int = 0, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    (x, y, flipped), val, test = load_digits_split(n_train, n_val, flip, seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    plain, concat = copy.deepcopy(model), copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9)
    opt_concat = torch.optim.SGD(concat.parameters(), lr=lr, momentum=0.9)
    eng = InRunShapley(model, opt, per_sample_ce, val, num_samples=n_train)
    # the layers' split route may build the C++ extension on first use (once per machine, ~30 s):
    # not part of a step's time
    resolve_backend(x[:1], primitive="split_dot")
    t_eng = t_plain = t_concat = 0.0
    loss_sum = torch.zeros(n_train, dtype=torch.float64)   # a baseline: loss summed over training
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, batch_size):
            ids = order[i:i + batch_size]
            batch = (x[ids], y[ids])
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            eng.step(batch, ids)
            opt.step()
            t1 = time.perf_counter()
            loss_sum[ids] += eng.last_losses.double()
            opt_plain.zero_grad(set_to_none=True)
            per_sample_ce(plain, batch).mean().backward()
            opt_plain.step()
            t2 = time.perf_counter()
            # the floor of any one-backward method: a plain step on train+val rows together
            opt_concat.zero_grad(set_to_none=True)
            per_sample_ce(concat, (torch.cat([batch[0], val[0]]), torch.cat([batch[1], val[1]]))).mean().backward()
            opt_concat.step()
            t3 = time.perf_counter()
            t_eng, t_plain, t_concat = t_eng + (t1 - t0), t_plain + (t2 - t1), t_concat + (t3 - t2)
    with torch.no_grad():
        acc = float((model(test[0]).argmax(1) == test[1]).float().mean())
    values = eng.values
    from .functional import grad_norms
    with torch.no_grad():
        final_loss = per_sample_ce(model, (x, y)).double()
    baselines = {"final training loss (high = suspect)": final_loss,
                 "loss summed over training (high)": loss_sum,
                 "per-sample gradient norm (high)": grad_norms(model, per_sample_ce, (x, y)).double()}
    return {"auroc": auroc(-values, flipped), "step_ratio": t_eng / t_plain, "test_acc": acc,
            "baselines": {name: auroc(s, flipped) for name, s in baselines.items()},
            "steps": eng.steps, "flipped": int(flipped.sum()), "n_train": n_train, "n_val": n_val,
            "mean_value_flipped": float(values[flipped].mean()),
            "mean_value_clean": float(values[~flipped].mean()),
            "ms_per_step": 1e3 * t_eng / eng.steps, "ms_per_plain_step": 1e3 * t_plain / eng.steps,
            "concat_ratio": t_concat / t_plain}


def main(argv=None) -> None:
    import argparse

    argv = list(argv or [])
    if argv[:1] == ["lm"]:   # the language-model curation demo
        from .demo_lm import main as lm_main
        return lm_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m inrun_kernels demo", description=__doc__)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    r = run(epochs=args.epochs, flip=args.flip, seed=args.seed, threads=args.threads)
    print(f"digits: {r['n_train']} training samples ({r['flipped']} labels flipped), "
          f"{r['n_val']} validation samples, {r['steps']} steps")
    print(f"mean value  clean {r['mean_value_clean']:+.3e}   flipped {r['mean_value_flipped']:+.3e}")
    print("flipped-label detection AUROC (0.5 = chance):")
    print(f"  In-Run value (low = suspect)          {r['auroc']:.3f}")
    for name, a in r["baselines"].items():
        print(f"  {name:<37} {a:.3f}")
    print(f"test accuracy of the model trained on noisy labels: {r['test_acc']:.3f}")
    print(f"time per step: {r['ms_per_step']:.2f} ms with InRunShapley vs {r['ms_per_plain_step']:.2f} ms "
          f"plain = {r['step_ratio']:.2f}x (a plain step on the {r['n_val']} validation rows joined to the "
          f"batch alone costs {r['concat_ratio']:.2f}x)")
