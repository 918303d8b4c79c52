"""Module type -> ghost rule. Supporting a layer type is one registration.

A rule says how to turn a module into its ghost version in place (keeping the parameter
objects, their names and state_dict keys) and back. patch.py walks a model and applies the rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


class GhostModule:
    """Marker mixin of every ghost layer. `ghost_batch_dim` is the dimension of the layer input
    that indexes samples (1 inside seq-first transformer layers)."""
    ghost_batch_dim: int = 0


@dataclass(frozen=True)
class Rule:
    module_type: type
    to_ghost: Callable[[nn.Module], None]    # in place
    from_ghost: Callable[[nn.Module], None]  # in place, exact inverse
    owns_children: bool = False              # e.g. attention: its projections are covered by it


_RULES: dict[type, Rule] = {}


def register(module_type: type, *, owns_children: bool = False):
    """Decorator for a ghost class G (a subclass of `module_type` that changes only forward):
    patching swaps an instance's class to G, unpatching swaps it back."""
    def deco(ghost_cls):
        register_rule(class_swap_rule(module_type, ghost_cls, owns_children=owns_children))
        return ghost_cls
    return deco


def class_swap_rule(module_type: type, ghost_cls: type, *, owns_children: bool = False) -> Rule:
    """The rule `register` makes: patching swaps an instance's class to ghost_cls and back."""
    def to_ghost(mod):
        mod._inrun_orig_class = type(mod)
        mod.__class__ = ghost_cls

    def from_ghost(mod):
        mod.__class__ = mod.__dict__.pop("_inrun_orig_class")

    return Rule(module_type, to_ghost, from_ghost, owns_children)


def register_rule(rule: Rule) -> None:
    _RULES[rule.module_type] = rule


_MATCHERS: list[Callable[[nn.Module], "Rule | None"]] = []


def register_matcher(fn: Callable[[nn.Module], "Rule | None"]) -> Callable:
    """A rule found by inspecting a module rather than by its type (e.g. third-party classes
    matched by name without importing their package). `fn(mod)` returns a Rule or None; a Rule
    it returns is registered for its module_type, so later lookups and unpatch find it."""
    _MATCHERS.append(fn)
    return fn


def lookup(mod: nn.Module) -> Rule | None:
    """The rule for this module: its exact type, or a registered base class whose forward the
    module's class does not override (a subclass with its own forward is NOT covered), or the
    first matcher that accepts it."""
    cls = type(mod)
    if cls in _RULES:
        return _RULES[cls]
    for base in cls.__mro__[1:]:
        if base in _RULES and getattr(cls, "forward", None) is getattr(base, "forward", None):
            return _RULES[base]
    for fn in _MATCHERS:
        rule = fn(mod)
        if rule is not None:
            register_rule(rule)
            return rule
    return None


def rule_for(module_type: type) -> Rule:
    rule = _RULES.get(module_type)
    if rule is None:
        for base in module_type.__mro__[1:]:
            if base in _RULES:
                return _RULES[base]
        raise KeyError(f"no ghost rule for {module_type.__name__}")
    return rule


def registered_types() -> list[type]:
    return list(_RULES)
