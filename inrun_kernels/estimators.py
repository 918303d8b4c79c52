"""Estimators: the dense vector V that each training sample's gradient is dotted with.

A step applies x_B = c * g_bar (g_bar the mean training gradient, c a uniform rescale such as
gradient clipping, 1 otherwise); sample i's share is x_i = c * g_i / N. With Delta the update
map of updates.py (state fixed at the step), D1/D2 its elementwise derivatives, every estimator
values sample i as  phi_i = <x_i, V>  (positive = helpful):

    first     V = S (.) g_val,   S = (Delta(0) - Delta(x_B)) / x_B  (secant; SGD: lr)
    midpoint  V = -D1(x_B/2) (.) grad L_val(w + Delta(x_B/2))         (Aumann-Shapley, one point)
    second    V = -D1(0) (.) (g_val + H_val u) - 1/2 D2(0) (.) x_B (.) g_val,
              u = Delta(0) + 1/2 D1(0) (.) x_B                          (SGD: lr (g_val - lr/2 H_val g_bar))

g_val, H_val: gradient and Hessian of the mean validation loss at w. "second" is the first-order
Taylor expansion of the midpoint vector around w, i.e. the exact second-order expansion of the
step's utility U(S) = L_val(w) - L_val(w + Delta(x_S)); the midpoint rule is exact whenever that
expansion is and better beyond it. Values sum to U(B) - U(empty) (to the estimator's order), which
is U(B) only when Delta(0) = 0 (no momentum, no weight decay).

Each estimator's `prepare(ctx)` runs what it needs on the validation rows (one plain forward and
backward, at w or at shifted weights; "second" a double backward) and returns V_p per parameter,
computed lazily so only one parameter's float64 temporaries live at a time.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

ESTIMATORS = ("first", "midpoint", "second")


class StepContext:
    """What an estimator sees: the parameters, the applied gradient x_B per parameter, the
    update map, and `val_grads` (validation-row passes, see shapley.py)."""

    def __init__(self, params: list[nn.Parameter], x: dict[int, Tensor], update,
                 val_grads: Callable[..., tuple[dict[int, Tensor], dict[int, Tensor] | None]]):
        self.params, self.x, self.update, self.val_grads = params, x, update, val_grads

    def x_of(self, p: nn.Parameter) -> Tensor:
        return self.x[id(p)].to(torch.float64)


class Estimator:
    name = "?"

    def in_backward(self, update, params) -> bool:
        """True when the values are per-parameter scalars times <g_i, g_val>: the ghost backward
        computes them with the cheapest product route, no vector V needed."""
        return False

    def prepare(self, ctx: StepContext) -> Callable[[nn.Parameter], Tensor]:
        raise NotImplementedError


class First(Estimator):
    name = "first"

    def in_backward(self, update, params) -> bool:
        return all(update.constant_slope(p) is not None for p in params)

    def prepare(self, ctx):
        g_val, _ = ctx.val_grads()
        return lambda p: ctx.update.secant(p, ctx.x_of(p)) * g_val[id(p)].to(torch.float64)


class Midpoint(Estimator):
    name = "midpoint"

    def prepare(self, ctx):
        g_mid, _ = ctx.val_grads(shift=lambda p: ctx.update.delta(p, ctx.x_of(p) / 2))
        return lambda p: -ctx.update.d1(p, ctx.x_of(p) / 2) * g_mid[id(p)].to(torch.float64)


class Second(Estimator):
    name = "second"

    def prepare(self, ctx):
        um = ctx.update
        # Adam's map has a kink at g = 0 where exp_avg_sq is 0 (its first step, rows that never
        # had a gradient): no second-order expansion there; those coordinates take the first-
        # order secant value instead (finite, exact at both ends of the step), with a warning
        kinks = {id(p): k & (ctx.x_of(p) != 0) for p in ctx.params
                 if (k := um.kinked_at_zero(p)) is not None}
        kinks = {key: k for key, k in kinks.items() if bool(k.any())}
        if kinks:
            warnings.warn("estimator='second': the optimizer's update has a kink at g = 0 where "
                          "exp_avg_sq is 0 (Adam's first step); those coordinates use the first-order "
                          "secant value. estimator='midpoint' is defined everywhere", stacklevel=4)

        def zero(p):
            return torch.zeros(p.shape, dtype=torch.float64, device=p.device)

        u = {id(p): (um.delta(p, zero(p)) + 0.5 * um.d1(p, zero(p)) * ctx.x_of(p)).to(p.dtype)
             for p in ctx.params}
        g_val, hu = ctx.val_grads(hvp=u)
        del u

        def vector(p):
            x, gv = ctx.x_of(p), g_val[id(p)].to(torch.float64)
            d1 = um.d1(p, zero(p))
            V = -d1 * (gv + hu[id(p)].to(d1.dtype)) - 0.5 * um.d2(p, zero(p)) * x * gv
            kink = kinks.get(id(p))
            return V if kink is None else torch.where(kink, um.secant(p, x) * gv, V)
        return vector


def make_estimator(name: str) -> Estimator:
    table = {"first": First, "midpoint": Midpoint, "second": Second}
    if name not in table:
        raise ValueError(f"estimator={name!r} is not one of {ESTIMATORS}")
    return table[name]()
