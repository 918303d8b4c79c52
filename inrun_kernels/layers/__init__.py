"""Ghost layers (autograd + modules) and the registry that maps module types to them."""
from .linear import GhostLinear
from .embedding import GhostEmbedding
from .norm import GhostLayerNorm, GhostRMSNorm
from .batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from . import conv1d  # noqa: F401  (matches transformers' Conv1D by class)
from .conv import GhostConv1d, GhostConv2d
from . import dropout  # noqa: F401  (training rows only inside a session)
from . import subclass  # noqa: F401  (probe-checked subclasses of the layers above)
from .attention import GhostMultiheadAttention
from .registry import GhostModule, Rule, lookup, register, register_rule, registered_types

__all__ = ["GhostLinear", "GhostEmbedding", "GhostLayerNorm", "GhostRMSNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostConv1d", "GhostConv2d", "GhostMultiheadAttention", "GhostModule", "Rule", "lookup", "register", "register_rule", "registered_types"]
