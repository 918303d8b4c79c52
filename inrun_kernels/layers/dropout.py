"""Dropout inside a ghost session: training rows only.

The engine runs training and validation rows through one forward. The validation gradient must
be the one of the model as evaluated (no dropout), while the training rows must get exactly the
dropout plain training gives them. Inside a session the ghost Dropout applies the module's own
dropout to the training rows alone (the same call on a tensor of the same shape as in plain
training, so the same RNG draws) and passes the validation rows through unchanged. Outside a
session it IS the original module. No parameters: nothing to cover, nothing changes in products.

An input whose sample dimension does not hold the session's rows (a broadcast mask, a tensor
without the batch dim) cannot be split: it is dropped out whole, with a warning naming the
module, once.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import session as _session
from .registry import GhostModule, class_swap_rule, register_rule

_WARNED: set[str] = set()


class GhostDropoutMixin(GhostModule):
    def forward(self, input: Tensor) -> Tensor:
        sess = _session.current()
        if sess is None or not self.training or self.p == 0 or sess.n_val == 0:
            return super().forward(input)
        bd = self.ghost_batch_dim
        if input.dim() <= bd or input.shape[bd] != sess.n_rows:
            name = getattr(self, "_inrun_name", type(self).__name__)
            if name not in _WARNED:
                _WARNED.add(name)
                warnings.warn(f"inrun_kernels: dropout '{name}' got an input of shape {tuple(input.shape)} "
                              f"whose dim {bd} does not hold the {sess.n_rows} rows of the step; it drops "
                              "out the validation rows too", stacklevel=2)
            return super().forward(input)
        n = sess.n_train
        train = super().forward(input.narrow(bd, 0, n))
        return torch.cat([train, input.narrow(bd, n, input.shape[bd] - n)], bd)


_GHOSTS: dict[type, type] = {}
for _cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
    _GHOSTS[_cls] = type(f"Ghost{_cls.__name__}", (GhostDropoutMixin, _cls), {"__module__": __name__})
    register_rule(class_swap_rule(_cls, _GHOSTS[_cls]))


def functional_dropouts(model: nn.Module) -> list[str]:
    """Modules that look like they apply dropout functionally (a float attribute named *dropout*
    above 0, as Hugging Face attention modules keep `attention_dropout`), which the ghost
    Dropout cannot split by rows. A heuristic, for a warning only."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd) or not mod.training:
            continue
        for attr, val in vars(mod).items():
            if "dropout" in attr and isinstance(val, float) and val > 0:
                found.append(f"{name or '<root>'}.{attr}={val}")
    return found
