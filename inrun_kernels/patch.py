"""patch / unpatch: swap supported layers for their ghost versions in place.

Parameters stay the same objects under the same names (state_dict keys unchanged), so
optimizers built before patching keep working. What cannot be covered fails loudly: a module
with trainable parameters and no rule is an error naming it (strict=False: a warning and a
coverage report), and a batch-coupling layer (BatchNorm in training mode, or without running
statistics) is always an error; BatchNorm in eval mode is covered (layers/batchnorm.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from . import layers  # noqa: F401  (registers the built-in rules)
from .layers.fallback import GhostFallback, fallback_rule, has_own_trainable, needs_fallback_for_children
from .layers.rawparam import GhostRawParams, eligible as raw_params_eligible, raw_param_rule
from .layers.registry import GhostModule, lookup, rule_for


class UnsupportedModuleError(TypeError):
    pass


class BatchCouplingError(RuntimeError):
    pass


@dataclass
class Coverage:
    covered: list[str] = field(default_factory=list)     # trainable parameter names covered
    uncovered: list[str] = field(default_factory=list)   # trainable parameter names not covered
    modules: dict[str, str] = field(default_factory=dict)  # uncovered module name -> type
    # modules covered by the per-sample fallback (layers/fallback.py): name -> (type, numel)
    fallback: dict[str, tuple[str, int]] = field(default_factory=dict)
    total_numel: int = 0                                    # trainable parameters, all modules
    # seconds each fallback module has spent in its forward+backward since patching (read when
    # coverage() is called): its cost share against a step's time
    fallback_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.uncovered

    def __str__(self) -> str:
        lines = [f"{len(self.covered)} trainable parameters covered, {len(self.uncovered)} not"]
        if self.fallback:
            fb = sum(k for _, k in self.fallback.values())
            lines.append(f"  {len(self.fallback)} modules by the per-sample fallback (exact, slower): "
                         f"{fb} of {self.total_numel} trainable elements "
                         f"({100.0 * fb / max(1, self.total_numel):.2f}%)")
            for m, (t, k) in self.fallback.items():
                sec = self.fallback_seconds.get(m)
                lines.append(f"    fallback: {m} ({t}, {k} elements"
                             + (f", {sec:.3f} s so far)" if sec is not None else ")"))
        lines += [f"  not covered: {n}" for n in self.uncovered]
        return "\n".join(lines)


def batch_coupling_error(name: str, mod: nn.Module) -> BatchCouplingError | None:
    """The error for a module that mixes the samples of a batch in forward, or None: BatchNorm
    in training mode, or with track_running_stats=False (batch statistics in eval mode too)."""
    if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return None
    cls = mod.__dict__.get("_inrun_orig_class", type(mod))   # a patched layer: its own class
    where = f"module '{name or '<root>'}' ({cls.__name__})"
    if mod.training:
        why = "is in training mode: BatchNorm normalises with batch statistics"
    elif mod.running_mean is None or mod.running_var is None:
        why = ("has no running statistics (track_running_stats=False): it normalises with batch "
               "statistics even in eval mode")
    else:
        return None
    return BatchCouplingError(
        f"{where} {why}, which couples the samples of a batch, so per-sample gradients are not "
        "defined. Put it in eval mode with running statistics (model.apply(freeze_bn)); then "
        "its affine weight and bias are covered exactly. Or replace it with GroupNorm/LayerNorm.")


def check_batch_coupling(model: nn.Module) -> None:
    """BatchNorm in training mode (or without running statistics) mixes samples in forward:
    per-sample values would be wrong. In eval mode with running statistics it is per sample."""
    for name, mod in model.named_modules():
        err = batch_coupling_error(name, mod)
        if err is not None:
            raise err


def _walk(model: nn.Module, fallback: bool = False):
    """(name, module, rule) top-down; children of a module whose rule owns them are skipped.
    fallback=True: a module with trainable parameters of its own and no native rule gets the
    per-sample fallback (layers/fallback.py), which owns its children."""
    stack = [("", model)]
    while stack:
        name, mod = stack.pop()
        rule = None if isinstance(mod, GhostModule) else lookup(mod)
        if (fallback and not isinstance(mod, GhostModule) and (rule is None or not rule.owns_children)
                and (needs_fallback_for_children(mod, lookup) or (rule is None and has_own_trainable(mod)))):
            # own parameters all broadcast-shaped (cls token, layer scale): native, checked per
            # call signature, the fallback where the check fails (layers/rawparam.py)
            rule = (raw_param_rule(mod) if rule is None and raw_params_eligible(mod)
                    and not needs_fallback_for_children(mod, lookup) else fallback_rule(mod))
        yield name, mod, rule
        if not _owns_children(mod, rule):
            kids = [(f"{name}.{k}" if name else k, m) for k, m in mod.named_children()]
            stack.extend(reversed(kids))


def _owns_children(mod: nn.Module, rule) -> bool:
    return rule.owns_children if rule is not None else bool(getattr(mod, "ghost_owns_children", False))


def _plan(model: nn.Module, fallback: bool = False):
    """The modules to patch and the coverage of trainable parameters (by object: a parameter
    shared by a covered and an uncovered module is uncovered, since that use would be lost)."""
    todo, covered, uncovered = [], {}, {}
    modules: dict[str, str] = {}
    fb: dict[str, tuple[str, int]] = {}
    for name, mod, rule in _walk(model, fallback):
        if ((isinstance(mod, GhostFallback) and not isinstance(mod, GhostRawParams))
                or (rule is not None and rule.to_ghost.__module__ == GhostFallback.__module__)):
            cls = mod.__dict__.get("_inrun_orig_class", type(mod))
            fb[name or "<root>"] = (cls.__name__, sum(p.numel() for p in mod.parameters() if p.requires_grad))
        ghost = rule is not None or isinstance(mod, GhostModule)
        if rule is not None:
            todo.append((name, mod, rule))
        for pname, p in mod.named_parameters(recurse=ghost and _owns_children(mod, rule)):
            if not p.requires_grad:
                continue
            full = f"{name}.{pname}" if name else pname
            if ghost:
                covered.setdefault(id(p), full)
            else:
                uncovered.setdefault(id(p), full)
                modules[name or "<root>"] = type(mod).__name__
    cov = Coverage(covered=[n for k, n in covered.items() if k not in uncovered],
                   uncovered=list(uncovered.values()), modules=modules, fallback=fb,
                   total_numel=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return todo, cov


def compiled_inner(model: nn.Module) -> tuple[nn.Module, str]:
    """torch.compile(model) (an OptimizedModule) -> (the module it compiles, the prefix of that
    module's names as seen from the wrapper). Patching acts on the inner module: its layers are
    what the compiled code calls (Dynamo recompiles once for the new classes)."""
    prefix = ""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model, prefix = model._orig_mod, prefix + "_orig_mod."
    return model, prefix


def patch(model: nn.Module, *, strict: bool = True, fallback: bool | None = None) -> nn.Module:
    """Swap every supported layer of `model` for its ghost version, in place; returns `model`.
    A torch.compile wrapper is accepted: the module it compiles is patched.

    fallback (default: = strict): a module with trainable parameters of its own that no native
    rule covers is covered by the exact per-sample fallback (layers/fallback.py: the module run
    once per sample; slower; a module that couples samples is refused at forward);
    `coverage(model).fallback` lists them with their sizes. A module whose own parameters are
    all broadcast-shaped (cls token, layer scale) is native instead where its uses check out at
    its first call with each input signature, the fallback where not (layers/rawparam.py).
    strict=True: a module with trainable parameters that nothing covers is an error naming it.
    strict=False: it is left as is with a warning; `coverage(model)` lists what is not covered."""
    fallback = strict if fallback is None else fallback
    wrapper, (model, prefix) = model, compiled_inner(model)
    if prefix:
        cov = _plan(model, fallback)[1]
        cov = _prefixed(cov, prefix)   # names as the caller sees them
        _patch(model, strict, cov, fallback)
        return wrapper
    _patch(model, strict, None, fallback)
    return model


def _patch(model: nn.Module, strict: bool, shown: Coverage | None, fallback: bool = False) -> None:
    check_batch_coupling(model)
    todo, cov = _plan(model, fallback)
    if cov.uncovered:
        named = shown or cov
        detail = ", ".join(f"'{m}' ({t})" for m, t in named.modules.items())
        msg = (f"inrun_kernels cannot compute per-sample products for trainable parameters of "
               f"{detail}: {', '.join(named.uncovered)}. Register a rule for the module type, freeze "
               "the parameters (requires_grad=False), or pass strict=False to skip them (their "
               "contribution is then left out of every value).")
        if strict:
            raise UnsupportedModuleError(msg)
        warnings.warn(msg, stacklevel=3)
    for name, mod, rule in todo:
        rule.to_ghost(mod)
    for name, mod in model.named_modules():
        if isinstance(mod, GhostModule):
            mod._inrun_name = name or type(mod).__name__
    model._inrun_coverage = cov


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes of every patched module; parameters are untouched."""
    wrapper, (model, _) = model, compiled_inner(model)
    for _, mod in model.named_modules():
        orig = mod.__dict__.get("_inrun_orig_class")
        if orig is not None:
            (raw_param_rule(mod) if isinstance(mod, GhostRawParams) else fallback_rule(mod)
             if isinstance(mod, GhostFallback) else rule_for(orig)).from_ghost(mod)
        mod.__dict__.pop("_inrun_name", None)
    model.__dict__.pop("_inrun_coverage", None)
    return wrapper


def is_patched(model: nn.Module) -> bool:
    return "_inrun_coverage" in compiled_inner(model)[0].__dict__


def coverage(model: nn.Module) -> Coverage:
    """What patch() covered; computed afresh for an unpatched model. Names are as seen from
    `model` (a torch.compile wrapper's start with "_orig_mod.")."""
    model, prefix = compiled_inner(model)
    cov = model.__dict__.get("_inrun_coverage") or _plan(model)[1]
    for name, mod in model.named_modules():   # broadcast-parameter modules that fell back at a call
        if isinstance(mod, GhostRawParams) and "_inrun_raw_fallback" in mod.__dict__:
            cov.fallback.setdefault(name or "<root>", (mod._inrun_orig_class.__name__,
                                                       sum(p.numel() for p in mod.parameters() if p.requires_grad)))
    if cov.fallback:
        mods = dict(model.named_modules())
        cov.fallback_seconds = {m: float(getattr(mods.get("" if m == "<root>" else m), "_inrun_fb_seconds", 0.0))
                                for m in cov.fallback}
    return _prefixed(cov, prefix) if prefix else cov


def _prefixed(cov: Coverage, prefix: str) -> Coverage:
    pre = lambda m: prefix + m if m != "<root>" else prefix.rstrip(".")  # noqa: E731
    return Coverage(covered=[prefix + n for n in cov.covered], uncovered=[prefix + n for n in cov.uncovered],
                    modules={pre(m): t for m, t in cov.modules.items()},
                    fallback={pre(m): v for m, v in cov.fallback.items()}, total_numel=cov.total_numel,
                    fallback_seconds={pre(m): v for m, v in cov.fallback_seconds.items()})
