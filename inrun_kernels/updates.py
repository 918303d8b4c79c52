"""Update maps: what one optimizer step does to a parameter as a function of its gradient.

    Delta_p(g) = (p after optimizer.step() with p.grad = g) - p,  optimizer state fixed

Every map here is elementwise (coordinate k of Delta depends on coordinate k of g only), so its
Jacobian is diagonal and the estimators need only elementwise quantities:

    delta(p, g)    Delta(g)
    d1(p, g)       dDelta/dg           (elementwise)
    d2(p, g)       d2Delta/dg2         (elementwise)
    secant(p, g)   (Delta(0) - Delta(g)) / g, its limit -d1(p, 0) where g == 0 (for SGD: lr)
    constant_slope(p)  the secant when it is one number for every g (SGD family), else None

Maps read the optimizer's param group and state at call time, i.e. as the step about to be
taken will see them (the engine calls them from an optimizer step pre-hook). Arithmetic is in
float64 for float64 parameters, else float32; `g` may carry leading batch dims (the fidelity
check evaluates many subsets at once).

    update="sgd"        SGDProxy: Delta(g) = -lr g (sign flipped under maximize), the paper's proxy
    update="optimizer"  the real map of torch.optim.SGD (momentum, dampening, nesterov,
                        weight_decay, maximize), Adam and AdamW (weight_decay, amsgrad, maximize)
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

UPDATES = ("optimizer", "sgd")


class UnsupportedOptimizerError(TypeError):
    pass


def compute_dtype(p: Tensor) -> torch.dtype:
    """float64 for float64 parameters, else float32 (the precision the optimizer steps in)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as(t, p: Tensor) -> Tensor:
    """A tensor (or number) in p's compute dtype, on p's device."""
    if isinstance(t, Tensor):
        return t.detach().to(device=p.device, dtype=compute_dtype(p))
    return torch.tensor(float(t), dtype=compute_dtype(p), device=p.device)


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class UpdateMap:
    """Base: maps parameters to their optimizer param group; subclasses define the math."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._group = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def group(self, p: nn.Parameter) -> dict | None:
        """The param group holding p, or None (then p is not updated: Delta = 0)."""
        return self._group.get(id(p))

    def lr(self, p: nn.Parameter) -> float:
        g = self.group(p)
        return 0.0 if g is None else _scalar(g["lr"])

    def sign(self, p: nn.Parameter) -> float:
        g = self.group(p)
        return -1.0 if g is not None and g.get("maximize", False) else 1.0

    def refresh(self) -> None:
        """Re-read the param groups (an optimizer may gain groups: add_param_group)."""
        self._group = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    # ---- the math (subclasses) -------------------------------------------------------------
    def delta(self, p: nn.Parameter, g: Tensor) -> Tensor:
        raise NotImplementedError

    def d1(self, p: nn.Parameter, g: Tensor) -> Tensor:
        raise NotImplementedError

    def d2(self, p: nn.Parameter, g: Tensor) -> Tensor:
        raise NotImplementedError

    def constant_slope(self, p: nn.Parameter) -> float | None:
        return None

    def kinked_at_zero(self, p: nn.Parameter) -> Tensor | None:
        """Where Delta has no second derivative at g = 0 (bool, p's shape), or None if nowhere."""
        return None

    def secant(self, p: nn.Parameter, g: Tensor) -> Tensor:
        g = _as(g, p)
        s = self.constant_slope(p)
        if s is not None:
            return torch.full_like(g, s)
        diff = self.delta(p, torch.zeros_like(g)) - self.delta(p, g)
        nz = g != 0
        return torch.where(nz, diff / torch.where(nz, g, 1.0), -self.d1(p, torch.zeros_like(g)))


class SGDProxy(UpdateMap):
    """update="sgd": Delta(g) = -lr g for every optimizer (the paper's value); maximize flips it."""
    name = "sgd"

    def constant_slope(self, p):
        return self.sign(p) * self.lr(p)

    def delta(self, p, g):
        return -self.constant_slope(p) * _as(g, p)

    def d1(self, p, g):
        return torch.full_like(_as(g, p), -self.constant_slope(p))

    def d2(self, p, g):
        return torch.zeros_like(_as(g, p))


class SGDMap(UpdateMap):
    """torch.optim.SGD: g' = sign*g + wd*p; buf' = mu*buf + (1-dampening)*g' (buf' = g' on the
    first step); direction = g' + mu*buf' (nesterov) or buf'; Delta = -lr * direction.
    Affine in g: its slope is one number per parameter."""
    name = "SGD"

    def _buf(self, p):
        grp = self.group(p)
        if grp is None or grp.get("momentum", 0) == 0:
            return None
        return self.optimizer.state.get(p, {}).get("momentum_buffer")

    def _k(self, p) -> float:
        """dDirection/dg' (direction as a function of the weight-decayed gradient g')."""
        grp = self.group(p)
        mu = float(grp.get("momentum", 0) or 0)
        if mu == 0:
            return 1.0
        kb = 1.0 - float(grp.get("dampening", 0) or 0) if self._buf(p) is not None else 1.0
        return 1.0 + mu * kb if grp.get("nesterov", False) else kb

    def constant_slope(self, p):
        if self.group(p) is None:
            return 0.0
        return self.lr(p) * self.sign(p) * self._k(p)

    def delta(self, p, g):
        grp = self.group(p)
        g = _as(g, p)
        if grp is None:
            return torch.zeros_like(g)
        gd = self.sign(p) * g
        wd = float(grp.get("weight_decay", 0) or 0)
        if wd:
            gd = gd + wd * _as(p, p)
        mu = float(grp.get("momentum", 0) or 0)
        if mu:
            buf = self._buf(p)
            b = gd if buf is None else mu * _as(buf, p) + (1.0 - float(grp.get("dampening", 0) or 0)) * gd
            gd = gd + mu * b if grp.get("nesterov", False) else b
        return -self.lr(p) * gd

    def d1(self, p, g):
        return torch.full_like(_as(g, p), -self.constant_slope(p))

    def d2(self, p, g):
        return torch.zeros_like(_as(g, p))


class AdamMap(UpdateMap):
    """torch.optim.Adam / AdamW, state (exp_avg m, exp_avg_sq v, step t) fixed:
        y = sign*g (+ wd*p for Adam's L2 decay); m' = b1 m + (1-b1) y; v' = b2 v + (1-b2) y^2
        r = sqrt(v_hat / bc2) with v_hat = v' (amsgrad: max(max_exp_avg_sq, v'))
        Delta = -(lr/bc1) m' / (r + eps)  (- lr*wd*p for AdamW's decoupled decay)
    with bc1 = 1 - b1^(t+1), bc2 = 1 - b2^(t+1). Derivatives and the secant in closed form (the
    secant without cancellation, so float32 is enough); where r = 0 (a coordinate that never had
    a gradient, at g = 0) the kink's one-sided terms are taken as 0."""
    name = "Adam"

    def _consts(self, p):
        grp = self.group(p)
        st = self.optimizer.state.get(p, {})
        b1, b2 = (_scalar(b) for b in grp["betas"])
        t = _scalar(st["step"]) + 1.0 if "step" in st else 1.0
        zero = torch.zeros_like(p, dtype=compute_dtype(p))   # (a DTensor for an FSDP2 shard)
        m = _as(st["exp_avg"], p) if "exp_avg" in st else zero
        v = _as(st["exp_avg_sq"], p) if "exp_avg_sq" in st else zero
        vmax = None
        if grp.get("amsgrad", False):
            vmax = _as(st["max_exp_avg_sq"], p) if "max_exp_avg_sq" in st else zero
        wd = float(grp.get("weight_decay", 0) or 0)
        decoupled = bool(grp.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)))
        return dict(lr=self.lr(p), b1=b1, b2=b2, bc1=1.0 - b1 ** t, bc2=1.0 - b2 ** t, eps=float(grp["eps"]),
                    m=m, v=v, vmax=vmax, l2=(wd * _as(p, p) if wd and not decoupled else None),
                    wd_dec=(wd if decoupled else 0.0), sign=self.sign(p))

    def kinked_at_zero(self, p):
        """Coordinates with v' = 0 at g = 0 (no gradient yet: Adam's first step, unused rows):
        there Delta(g) ~ -lr sign(g), not twice differentiable at 0."""
        if self.group(p) is None:
            return None
        c = self._consts(p)
        y0 = torch.zeros_like(c["m"]) if c["l2"] is None else c["l2"]
        v0 = torch.addcmul(c["v"] * c["b2"], y0, y0, value=1 - c["b2"])
        if c["vmax"] is not None:
            v0 = torch.maximum(c["vmax"], v0)
        return v0 == 0

    @staticmethod
    def _y(c, g):
        y = c["sign"] * g
        return y if c["l2"] is None else y + c["l2"]

    @staticmethod
    def _r(c, v1):
        vh = v1 if c["vmax"] is None else torch.maximum(c["vmax"], v1)
        return (vh / c["bc2"]).sqrt_()

    def _parts(self, p, g):
        c = self._consts(p)
        y = self._y(c, _as(g, p))
        m1 = torch.lerp(c["m"], y, 1 - c["b1"])
        v1 = torch.addcmul(c["v"] * c["b2"], y, y, value=1 - c["b2"])
        r = self._r(c, v1)
        # dr/dy, zero where r = 0 or where amsgrad's max does not follow v'
        live = r > 0 if c["vmax"] is None else (r > 0) & (v1 >= c["vmax"])
        r_safe = torch.where(r > 0, r, 1.0)
        dr = torch.where(live, (1 - c["b2"]) * y / (c["bc2"] * r_safe), 0.0)
        return c, y, m1, r, r_safe, dr, live

    def delta(self, p, g):
        if self.group(p) is None:
            return torch.zeros_like(_as(g, p))
        c = self._consts(p)
        y = self._y(c, _as(g, p))
        m1 = torch.lerp(c["m"], y, 1 - c["b1"])
        r = self._r(c, torch.addcmul(c["v"] * c["b2"], y, y, value=1 - c["b2"]))
        out = m1.div_(r.add_(c["eps"])).mul_(-c["lr"] / c["bc1"])
        if c["wd_dec"]:
            out = out - c["lr"] * c["wd_dec"] * _as(p, p)
        return out

    def d1(self, p, g):
        if self.group(p) is None:
            return torch.zeros_like(_as(g, p))
        c, y, m1, r, _, dr, _ = self._parts(p, g)
        D = r + c["eps"]
        dF = (1 - c["b1"]) / D - m1 * dr / D ** 2     # d(m'/D)/dy
        return -(c["lr"] / c["bc1"]) * c["sign"] * dF

    def d2(self, p, g):
        if self.group(p) is None:
            return torch.zeros_like(_as(g, p))
        c, y, m1, r, r_safe, dr, live = self._parts(p, g)
        ddr = torch.where(live, (1 - c["b2"]) / (c["bc2"] * r_safe) * (1 - y * dr / r_safe), 0.0)
        D = r + c["eps"]
        ddF = -2 * (1 - c["b1"]) * dr / D ** 2 - m1 * ddr / D ** 2 + 2 * m1 * dr ** 2 / D ** 3
        return -(c["lr"] / c["bc1"]) * ddF    # sign^2 = 1

    def secant(self, p, g):
        """(Delta(0) - Delta(x)) / x = (lr/bc1) [(1-b1) s / D1 - m0 (v_hat1 - v_hat0) / (x bc2 (r0 + r1) D0 D1)]
        with s = sign, subscripts 0 and 1 at g = 0 and g = x; (v_hat1 - v_hat0) / x in closed form.
        In-place arithmetic: this runs over every parameter at every step."""
        x = _as(g, p)
        if self.group(p) is None:
            return torch.zeros_like(x)
        c = self._consts(p)
        b1, b2, s = c["b1"], c["b2"], c["sign"]
        if c["l2"] is None:   # y0 = 0
            m0, v0 = c["m"] * b1, c["v"] * b2
            dv_dx = x * (1 - b2)                         # (v1 - v0) / x
        else:
            y0 = c["l2"]
            m0 = torch.lerp(c["m"], y0, 1 - b1)
            v0 = torch.addcmul(c["v"] * b2, y0, y0, value=1 - b2)
            dv_dx = (y0 * 2 + s * x).mul_((1 - b2) * s)
        v1 = torch.addcmul(v0, dv_dx, x)
        if c["vmax"] is not None:                        # amsgrad: the max may not follow v'
            vmax = c["vmax"]
            nz = x != 0
            jump = (torch.maximum(vmax, v1) - torch.maximum(vmax, v0)) / torch.where(nz, x, 1.0)
            dv_dx = torch.where((v0 >= vmax) & (v1 >= vmax), dv_dx, torch.where(nz, jump, 0.0))
            v0, v1 = torch.maximum(vmax, v0), torch.maximum(vmax, v1)
        r0 = v0.div_(c["bc2"]).sqrt_()
        r1 = v1.div_(c["bc2"]).sqrt_()
        # r0 + r1 = 0 only where v_hat0 = 0 and x = 0, and there m0 * dv_dx = 0 too
        den = (r0 + r1).mul_(c["bc2"])
        D0, D1 = r0.add_(c["eps"]), r1.add_(c["eps"])
        den.mul_(D0).mul_(D1).clamp_min_(torch.finfo(den.dtype).tiny)
        cross = m0.mul_(dv_dx).div_(den)
        return D1.reciprocal_().mul_((1 - b1) * s).sub_(cross).mul_(c["lr"] / c["bc1"])


def _steps_like(optimizer, base: type) -> bool:
    """An instance of `base` (or a subclass) whose step is base's own (torch wraps step methods
    with profiling hooks, hence the unwrap)."""
    if not isinstance(optimizer, base):
        return False
    own = inspect.unwrap(base.step)
    return inspect.unwrap(type(optimizer).step) is own


def make_update(optimizer: torch.optim.Optimizer, update: str) -> UpdateMap:
    """The update map for `update` ("optimizer" | "sgd") and this optimizer, or a clear error."""
    if update not in UPDATES:
        raise ValueError(f"update={update!r} is not one of {UPDATES}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise UnsupportedOptimizerError(
            "LBFGS (a closure optimizer) evaluates the loss several times per optimizer step, so "
            "one training step has no single update to value; use a first-order optimizer")
    if update == "sgd":
        return SGDProxy(optimizer)
    if _steps_like(optimizer, torch.optim.SGD):
        return SGDMap(optimizer)
    if _steps_like(optimizer, torch.optim.Adam):
        return AdamMap(optimizer)   # AdamW is an Adam with decoupled_weight_decay=True
    raise UnsupportedOptimizerError(
        f"update='optimizer' does not model {type(optimizer).__name__}'s update (supported: SGD with "
        "momentum/nesterov/weight decay/maximize, Adam, AdamW); pass update='sgd' for the paper's "
        "SGD-form value (lr/N)<g_i, g_val> instead")
