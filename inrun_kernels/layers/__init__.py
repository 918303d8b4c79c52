"""Ghost layers (autograd + modules) and the registry that maps module types to them."""
from .linear import GhostLinear
from .registry import GhostModule, Rule, lookup, register, register_rule, registered_types

__all__ = ["GhostLinear", "GhostModule", "Rule", "lookup", "register", "register_rule", "registered_types"]
