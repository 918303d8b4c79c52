"""LayerNorm / RMSNorm (torch and Hugging Face RMSNorm-style modules).

Inside a ghost session the layer runs as  y = xhat * weight (+ bias)  where xhat, the
normalised input, comes from ordinary autograd ops (so the input gradient is PyTorch's own), and
the affine step is a custom autograd Function. Its backward forms the per-sample gradients
directly, they are as small as the parameters: weight sum_t gy * xhat, bias sum_t gy (Direct reps),
and returns only the training rows' parameter gradients.

Hugging Face RMS norms are matched by name without importing transformers: a class named
*RMSNorm or *LayerNorm with one parameter `weight` [d] and `variance_epsilon` or `eps`, whose
forward is checked once per class on a probe input against three forms (the one that agrees
best is taken, and it must agree to the dtype's tolerance; each is replayed op for op, so a
float64 model's output is bitwise the original's):
  "llama" (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, ...):
      weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)
  "t5" (T5LayerNorm and its copies, no mean subtraction, no bias):
      weight * (x * rsqrt(mean(x.float()^2) + eps)), cast to weight's dtype when half
  "unit" (Gemma, Gemma2, Gemma3: a weight stored as an offset from 1):
      ((x.float() * rsqrt(mean(x^2) + eps)) * (1 + weight.float())).to(x.dtype)
     d(1 + w)/dw = 1: the per-sample gradient is sum_t gy * xhat, as for the others.
Variants that compute something else (other eps placements, a mean subtraction) fail the probe
and go to the per-sample fallback rather than being silently wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from .. import session as _session
from . import compiled as _compiled
from ..ops.reference import acc_dtype
from ..reps import Direct
from .registry import GhostModule, Rule, class_swap_rule, register, register_matcher


def _per_sample(t: Tensor, batch_dim: int, shape: torch.Size) -> Tensor:
    """[..., *shape] with samples on batch_dim -> [samples, *shape] summed over everything else."""
    if batch_dim != 0:
        t = t.movedim(batch_dim, 0)
    return t.reshape(t.shape[0], -1, *shape).sum(1)


class _GhostAffineFn(torch.autograd.Function):
    """y = xhat * weight (+ bias), weight/bias over the trailing dims of xhat; unit=True:
    y = xhat * (1 + weight.float()) (Gemma's RMSNorm, computed as it does)."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, sess, name, batch_dim, unit=False):
        sess.note_forward(weight, bias)
        ctx.save_for_backward(xhat)
        ctx.weight, ctx.bias, ctx.sess, ctx.name, ctx.batch_dim = weight, bias, sess, name, batch_dim
        ctx.unit = unit
        y = xhat * (1.0 + weight.float()) if unit else xhat * weight
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, gy):
        (xhat,) = ctx.saved_tensors
        weight = ctx.weight
        scale = 1.0 + weight.float() if ctx.unit else weight
        gx = (gy * scale).to(xhat.dtype) if ctx.needs_input_grad[0] else None
        gw, gb = affine_backward(ctx.sess, ctx.name, xhat, gy, weight, ctx.bias, ctx.batch_dim,
                                 ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gx, gw, gb, None, None, None, None


def affine_backward(sess, name: str, xhat: Tensor, gy: Tensor, weight: nn.Parameter,
                    bias: nn.Parameter | None, batch_dim: int, need_w: bool, need_b: bool):
    """Hands the session the per-sample gradients (Direct reps) of weight and bias; returns the
    training rows' gradients scaled for the mean training loss (None where not needed or left
    alone)."""
    if sess.closed:
        return None, None
    bd = batch_dim
    sess.check_rows(xhat.shape[bd], name)
    N = sess.n_train
    dt = acc_dtype(gy, xhat)
    gw = gb = None
    if weight.requires_grad:
        g = _per_sample(gy.to(dt) * xhat.to(dt), bd, weight.shape)
        # a float64 weight used in float32 (Gemma's (1 + w.float())): its per-sample gradient is
        # the float32 sum, held in float64 as autograd casts it, so products run in float64
        g = g.to(torch.promote_types(g.dtype, weight.dtype))
        if sess.grad_scale is not None and need_w:
            gw = (g[:N].sum(0) * sess.grad_scale).to(weight.dtype)
        sess.add((weight,), Direct(g[:N]), Direct(g[N:]))
    if bias is not None and bias.requires_grad:
        g = _per_sample(gy.to(dt), bd, bias.shape)
        if sess.grad_scale is not None and need_b:
            gb = (g[:N].sum(0) * sess.grad_scale).to(bias.dtype)
        sess.add((bias,), Direct(g[:N]), Direct(g[N:]))
    return gw, gb


def _trainable(*params) -> bool:
    return any(p is not None and p.requires_grad for p in params)


def _affine(mod: nn.Module, sess, xhat: Tensor, weight, bias, unit: bool = False) -> Tensor:
    """xhat * weight (+ bias); unit=True: xhat * (1 + weight.float()) (no bias)."""
    name = getattr(mod, "_inrun_name", type(mod).__name__)
    rows = sess.n_rows
    if (mod.ghost_batch_dim == 0 and xhat.dim() == 2 and weight.dim() == 1 and xhat.shape[0] != rows
            and xhat.shape[0] % rows == 0):
        # tokens flattened sample-major, [B * T, d] (OPT's final_layer_norm), as in GhostLinear
        return _affine(mod, sess, xhat.view(rows, -1, xhat.shape[-1]), weight, bias, unit).reshape(xhat.shape)
    if torch.compiler.is_compiling():
        _compiled.check_no_autocast(xhat, name)
        y = torch.ops.inrun.ghost_affine(xhat, weight, bias, name, mod.ghost_batch_dim, False)
        # (1 + w) x as x + w x: the same gradients; the output may differ from Gemma's by 1 ulp
        return xhat + y if unit else y
    return _GhostAffineFn.apply(xhat, weight, bias, sess, name, mod.ghost_batch_dim, unit)


@register(nn.LayerNorm)
class GhostLayerNorm(GhostModule, nn.LayerNorm):
    """Drop-in nn.LayerNorm. Outside a ghost session it IS nn.LayerNorm."""

    def forward(self, input: Tensor) -> Tensor:
        sess = _session.current()
        if sess is None or not _trainable(self.weight, self.bias):
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        if self.weight is None:   # bias only: not something nn.LayerNorm builds
            raise NotImplementedError(f"LayerNorm '{getattr(self, '_inrun_name', '')}' has a bias but no weight")
        xhat = F.layer_norm(input, self.normalized_shape, None, None, self.eps)
        return _affine(self, sess, xhat, self.weight, self.bias)


@register(nn.RMSNorm)
class GhostRMSNorm(GhostModule, nn.RMSNorm):
    """Drop-in nn.RMSNorm. Outside a ghost session it IS nn.RMSNorm."""

    def forward(self, x: Tensor) -> Tensor:
        sess = _session.current()
        if sess is None or not _trainable(self.weight):
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        xhat = F.rms_norm(x, self.normalized_shape, None, self.eps)
        return _affine(self, sess, xhat, self.weight, None)


# ---- Hugging Face RMSNorm-style modules ------------------------------------------------------
def _hf_eps(mod: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(mod, attr, None)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            return float(eps)
    return None


def _hf_rms_normalise(x: Tensor, eps: float) -> Tensor:
    """What LlamaRMSNorm computes before the weight: float32 statistics, cast back."""
    return _rms_f32(x, eps).to(x.dtype)


def _rms_f32(x: Tensor, eps: float) -> Tensor:
    h = x.to(torch.float32)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _t5_normalise(x: Tensor, eps: float, w_dtype: torch.dtype) -> Tensor:
    """What T5LayerNorm computes before the weight: float32 statistics, x in its own dtype."""
    h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
    return h.to(w_dtype) if w_dtype in (torch.float16, torch.bfloat16) else h


def _rms_form(form: str, x: Tensor, w: Tensor, eps: float) -> Tensor:
    """The reference computation of each matched form (see module doc)."""
    if form == "llama":
        return w * _hf_rms_normalise(x, eps)
    if form == "t5":
        return w * _t5_normalise(x, eps, w.dtype)
    return (_rms_f32(x, eps) * (1.0 + w.float())).to(x.dtype)   # "unit"


class GhostHFRMSNorm(GhostModule):
    """Mixin of the ghost subclasses made for matched HF RMS norm classes (see module doc);
    `_inrun_form` is the form its class's forward was matched to."""
    _inrun_form = "llama"

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        sess = _session.current()
        if sess is None or args or kwargs or not _trainable(self.weight):
            return super().forward(hidden_states, *args, **kwargs)
        x, w, eps = hidden_states, self.weight, _hf_eps(self)
        if self._inrun_form == "llama":
            return _affine(self, sess, _hf_rms_normalise(x, eps), w, None)
        if self._inrun_form == "t5":
            return _affine(self, sess, _t5_normalise(x, eps, w.dtype), w, None)
        return _affine(self, sess, _rms_f32(x, eps), w, None, unit=True).to(x.dtype)


_HF_GHOSTS: dict[type, type] = {}


def _probe_form(mod: nn.Module, eps: float) -> str | None:
    """Which form (see module doc) the class's own forward computes, or None. Checked at two
    input scales, the second ~sqrt(eps) so that where eps enters matters; the form that agrees
    best must agree to the dtype's tolerance. The weight is a random stand-in of the real one's
    dtype (a real weight of zeros or ones could make two forms agree); the module is restored."""
    w = mod.weight
    tol = {torch.float64: 1e-5, torch.float32: 1e-4}.get(w.dtype, 2e-2)
    gen = torch.Generator().manual_seed(0)
    errs = {"llama": 0.0, "t5": 0.0, "unit": 0.0}
    w = (1.0 + 0.5 * torch.randn(w.shape, generator=gen, dtype=torch.float64)).to(device=w.device, dtype=w.dtype)
    try:
        with torch.no_grad(), _reparametrize_module(mod, {"weight": w}):
            for scale in (1.0, max(eps, 1e-12) ** 0.5):
                x = (torch.randn(2, 3, w.shape[0], generator=gen, dtype=torch.float64) * scale)
                x = x.to(device=w.device, dtype=w.dtype)
                got = type(mod).forward(mod, x)
                for form in errs:
                    want = _rms_form(form, x, w, eps)
                    if got.shape != want.shape:
                        return None
                    err = (got.double() - want.double()).abs().max()
                    errs[form] = max(errs[form], float(err / want.double().abs().max().clamp_min(1e-30)))
    except Exception:   # noqa: BLE001  (any failure: not provably an RMS norm, leave it to the fallback)
        return None
    form = min(errs, key=errs.get)   # ties (float32: llama and t5 agree): the first
    return form if errs[form] <= tol else None


@register_matcher
def _match_hf_rmsnorm(mod: nn.Module) -> Rule | None:
    cls = type(mod)
    if isinstance(mod, GhostModule) or not cls.__name__.endswith(("RMSNorm", "LayerNorm")):
        return None
    params = dict(mod.named_parameters())
    w = params.get("weight")
    eps = _hf_eps(mod)
    if set(params) != {"weight"} or w.dim() != 1 or eps is None or w.is_meta:
        return None
    form = _probe_form(mod, eps)
    if form is None:
        return None
    ghost = _HF_GHOSTS.get(cls)
    if ghost is None:
        ghost = _HF_GHOSTS[cls] = type(f"Ghost{cls.__name__}", (GhostHFRMSNorm, cls),
                                       {"__module__": __name__, "_inrun_form": form})
    return class_swap_rule(cls, ghost)
