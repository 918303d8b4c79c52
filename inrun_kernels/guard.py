"""Gradient-path guard: every gradient of a covered parameter must come from a ghost layer.

The engine backpropagates the SUM of training and validation losses once; only the ghost
layers split the rows (their backward writes the training rows' gradient and computes the
per-sample products). A covered parameter that also reaches the loss by another op (a tied head
written `h @ emb.weight.T`, an L2 penalty inside loss_fn, a functional use in a custom module)
would get the validation rows' share of that path in .grad and no per-sample product for it.

The check is structural and runs after the forward, before the backward: it walks the autograd
graph once and looks at every edge into a trainable parameter's gradient accumulator. An edge
from a node that is not a ghost layer's backward, into a covered parameter, is an error naming
the parameter and the op; nothing has been computed yet, so .grad is untouched. (Parameters
that patch() left uncovered, strict=False, get their exact gradient by a restricted second
backward instead; one that is ALSO used by a ghost layer is an error, as its ghost use would be
lost there.) Cost: one pass over the graph's nodes in Python, no tensor work.

Not visible to it: ops that mix samples without touching parameters (x - x.mean(0)), custom
autograd Functions, graphs hidden inside reentrant checkpointing; `ik.verify` checks those
against plain autograd.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .layers.compiled import compiled_grad_sources

_GHOST_MODULE_PREFIX = __name__.rsplit(".", 1)[0] + ".layers"


class GradientPathError(RuntimeError):
    pass


def _is_ghost(node) -> bool:
    """A backward node of an autograd Function defined by a ghost layer."""
    fwd = getattr(type(node), "_forward_cls", None)
    return fwd is not None and getattr(fwd, "__module__", "").startswith(_GHOST_MODULE_PREFIX)


def foreign_edges(losses: Tensor, key: Callable[[Tensor], int] = id) -> dict[int, tuple[set[str], bool]]:
    """{key(param): (names of non-ghost ops feeding its gradient, whether a ghost op does too)}
    for every leaf reached from `losses` (key: id, or id of the parameter a leaf stands for, as
    FSDP2's unsharded parameters stand for the sharded ones)."""
    out: dict[int, tuple[set[str], bool]] = {}
    seen = set()
    stack = [losses.grad_fn] if losses.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        ghost = _is_ghost(node)
        # a torch.compile'd region: what feeds each input's gradient, read from its graph
        inside = None if ghost else compiled_grad_sources(node)
        for k, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)   # AccumulateGrad: the leaf it feeds
            if var is not None:
                ops, by_ghost = out.get(key(var), (set(), False))
                if inside is not None:
                    ops |= inside[k][0]
                    by_ghost = by_ghost or inside[k][1]
                elif not ghost:
                    ops.add(type(node).__name__)
                out[key(var)] = (ops, by_ghost or ghost)
            elif nxt not in seen:
                stack.append(nxt)
    return out


def check_paths(losses: Tensor, params: list[nn.Parameter], uncovered: set[int],
                names: dict[int, str], canonical: Callable | None = None) -> None:
    """Raise GradientPathError if a covered parameter gets gradient from a non-ghost op, or an
    uncovered one from a ghost op too."""
    edges = foreign_edges(losses, id if canonical is None else (lambda v: id(canonical(v))))
    problems = []
    for p in params:
        ops, by_ghost = edges.get(id(p), (set(), False))
        name = names.get(id(p), f"param@{id(p):x}")
        if id(p) in uncovered:
            if by_ghost and ops:
                problems.append(f"'{name}' is used by a ghost layer and by an uncovered module "
                                f"({', '.join(sorted(ops))}): its ghost use would be lost")
        elif ops:
            problems.append(f"'{name}' gets gradient through {', '.join(sorted(ops))} outside "
                            "the ghost layers")
    if problems:
        raise GradientPathError(
            "inrun_kernels: " + "; ".join(problems) + ". The per-sample products would miss that "
            "path and the validation rows' share of it would reach .grad. Typical causes: a "
            "parameter used directly in forward (e.g. a tied head written `h @ emb.weight.T`: "
            "use an nn.Linear whose weight is the embedding's), or a parameter term inside "
            "loss_fn (e.g. an L2 penalty: use the optimizer's weight_decay, which "
            "update='optimizer' values exactly). Nothing was computed; .grad is unchanged.")
