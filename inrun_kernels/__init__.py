"""inrun_kernels: In-Run Data Shapley from ghost per-sample gradient products.

Layers: kernels (Triton) -> ops (references + dispatch) -> layers (autograd + modules) ->
patch -> functional -> shapley (engine). See README.md.
"""
from . import hf
from .estimators import ESTIMATORS
from .fidelity import FidelityReport, fidelity_check
from .functional import grad_dot, grad_gram, grad_norms
from .hf import causal_lm_loss, sequence_classification_loss
from .layers import GhostLinear, register
from .ledger import ValueLedger
from .ops import temp_budget
from .patch import BatchCouplingError, UnsupportedModuleError, coverage, patch, unpatch
from .results import Values
from .session import ghost_session
from .shapley import InRunShapley
from .updates import UPDATES, UnsupportedOptimizerError
from .verify import VerificationError, verify

__version__ = "0.1.0"

__all__ = ["grad_dot", "grad_gram", "grad_norms", "GhostLinear", "register", "ValueLedger",
           "temp_budget", "BatchCouplingError", "UnsupportedModuleError", "coverage", "patch",
           "unpatch", "ghost_session", "InRunShapley", "hf", "causal_lm_loss",
           "sequence_classification_loss", "ESTIMATORS", "UPDATES", "UnsupportedOptimizerError",
           "fidelity_check", "FidelityReport", "verify", "VerificationError", "Values"]
