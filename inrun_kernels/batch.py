"""Batches: a Tensor, a tuple/list of Tensors, or a dict of Tensors; the leading dim indexes
samples, and non-tensor entries are passed through. Train and validation batches are joined
along the sample dim into the one batch the engine runs forward and backward on.

`check_same_structure(train, val)` says, before anything runs, whether the two can be joined
(dict batches may differ in sequence length); `pad_to` / `pad_common` right-pad Hugging
Face-style dict batches to a common sequence length."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


def _leaves(batch: Any, where: str) -> list[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        return [(where, batch)]
    if isinstance(batch, (tuple, list)):
        return [(f"{where}[{i}]", t) for i, t in enumerate(batch) if isinstance(t, Tensor)]
    if isinstance(batch, dict):
        return [(f"{where}[{k!r}]", t) for k, t in batch.items() if isinstance(t, Tensor)]
    raise TypeError(f"{where}: a batch must be a Tensor, a tuple/list of Tensors or a dict of "
                    f"Tensors, got {type(batch).__name__}")


_WHAT = {"train": "training batch (train)", "val": "validation batch (val)"}


def batch_size(batch: Any, where: str = "batch") -> int:
    """The number of samples (rows) of a batch; a clear error for a malformed or empty one."""
    leaves = _leaves(batch, where)
    if not leaves:
        raise ValueError(f"{where} holds no tensor")
    sizes = {}
    for name, t in leaves:
        if t.dim() == 0:
            raise ValueError(f"{name} is a scalar; every tensor of a batch needs a leading sample dim")
        sizes[name] = t.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: tensors disagree on the number of samples: {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"the {_WHAT.get(where, where)} is empty (0 rows); every batch needs at "
                         "least one sample")
    return n


def concat(train: Any, val: Any) -> Any:
    """train rows first, then val rows; every dim but the first must agree."""
    if type(train) is not type(val) and not (isinstance(train, (tuple, list)) and isinstance(val, (tuple, list))):
        raise TypeError(f"train is a {type(train).__name__} but val is a {type(val).__name__}")

    def join(name: str, a, b):
        if not isinstance(a, Tensor):
            return a
        if not isinstance(b, Tensor):
            raise TypeError(f"train{name} is a Tensor but val{name} is {type(b).__name__}")
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"train{name} has shape {tuple(a.shape)} but val{name} has {tuple(b.shape)}: "
                             "all dims but the first (samples) must agree; pad to a common length")
        if a.dtype != b.dtype:
            raise TypeError(f"train{name} is {a.dtype} but val{name} is {b.dtype}")
        return torch.cat([a, b.to(a.device)], 0)

    batch_size(train, "train")
    batch_size(val, "val")
    if isinstance(train, Tensor):
        return join("", train, val)
    if isinstance(train, (tuple, list)):
        if len(train) != len(val):
            raise ValueError(f"train has {len(train)} entries but val has {len(val)}")
        return type(train)(join(f"[{i}]", a, b) for i, (a, b) in enumerate(zip(train, val)))
    if set(train) != set(val):
        raise ValueError(f"train and val have different keys: {sorted(set(train) ^ set(val))}")
    return {k: join(f"[{k!r}]", train[k], val[k]) for k in train}


# ---- structure checks and padding (HF-style dict batches) --------------------------------------
SEQ_KEYS = ("input_ids", "attention_mask", "labels")
IGNORE_INDEX = -100
_DEFAULT_PAD = {"attention_mask": 0, "labels": IGNORE_INDEX}


def _is_int(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


def seq_len(batch: Any) -> int | None:
    """The sequence length T of a dict batch: dim 1 of its 2-D input_ids (else attention_mask,
    else labels); None for other batches or a dict without them."""
    if not isinstance(batch, dict):
        return None
    for k in SEQ_KEYS:
        t = batch.get(k)
        if isinstance(t, Tensor) and t.dim() == 2:
            return t.shape[1]
    return None


def _paddable(batch: dict, key: str, T: int | None) -> bool:
    """A [B, T] entry that pad_to pads: attention_mask (any dtype), or an integer/bool tensor
    (input_ids, labels, token_type_ids, position_ids, ...)."""
    t = batch[key]
    return (T is not None and isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == T
            and (key == "attention_mask" or _is_int(t)))


def check_same_structure(train: Any, val: Any) -> None:
    """Can `val` be joined with `train` (concat)? Both non-empty, the same kind of batch (Tensor,
    tuple/list, dict), the same length / keys, tensors where the other has tensors, with the same
    dtype, number of dims and every dim but the first (samples). Dict batches may differ in
    sequence length (dim 1 of their [B, T] input_ids, attention_mask, labels and other integer
    [B, T] tensors): `pad_common` pads them to a common length. Raises a ValueError or TypeError
    naming the entry; returns None."""
    batch_size(train, "train")
    batch_size(val, "val")
    if isinstance(train, Tensor) or isinstance(val, Tensor):
        if not (isinstance(train, Tensor) and isinstance(val, Tensor)):
            raise TypeError(f"train is a {type(train).__name__} but val is a {type(val).__name__}")
        _check_leaf("", train, val, False)
    elif isinstance(train, (tuple, list)) or isinstance(val, (tuple, list)):
        if not (isinstance(train, (tuple, list)) and isinstance(val, (tuple, list))):
            raise TypeError(f"train is a {type(train).__name__} but val is a {type(val).__name__}")
        if len(train) != len(val):
            raise ValueError(f"train has {len(train)} entries but val has {len(val)}")
        for i, (a, b) in enumerate(zip(train, val)):
            _check_leaf(f"[{i}]", a, b, False)
    else:
        if type(train) is not type(val):
            raise TypeError(f"train is a {type(train).__name__} but val is a {type(val).__name__}")
        if set(train) != set(val):
            raise ValueError(f"train and val have different keys: {sorted(map(str, set(train) ^ set(val)))}")
        tt, tv = seq_len(train), seq_len(val)
        for k in train:
            seq = _paddable(train, k, tt) and _paddable(val, k, tv)
            _check_leaf(f"[{k!r}]", train[k], val[k], seq)


def _check_leaf(name: str, a: Any, b: Any, seq: bool) -> None:
    if isinstance(a, Tensor) != isinstance(b, Tensor):
        raise TypeError(f"train{name} is a {type(a).__name__} but val{name} is a {type(b).__name__}")
    if not isinstance(a, Tensor):
        return
    if a.dtype != b.dtype:
        raise TypeError(f"train{name} is {a.dtype} but val{name} is {b.dtype}")
    if a.dim() != b.dim() or a.shape[1 + seq:] != b.shape[1 + seq:]:
        what = "all dims but the first (samples) and the second (sequence)" if seq else \
            "all dims but the first (samples)"
        raise ValueError(f"train{name} has shape {tuple(a.shape)} but val{name} has {tuple(b.shape)}: "
                         f"{what} must agree")


def pad_to(batch: dict, length: int, pad_values: Mapping[str, Any] | int | None = None) -> dict:
    """A new dict batch with its [B, T] entries right-padded to `length`: input_ids with the pad
    id (pad_values={"input_ids": tokenizer.pad_token_id}, or pad_values=that id), attention_mask
    with 0, labels with -100, other integer [B, T] tensors with 0; `pad_values` overrides any
    key. Other entries are kept (the same objects); the batch is never truncated."""
    if not isinstance(batch, dict):
        raise TypeError(f"pad_to pads dict batches (input_ids, attention_mask, labels, ...), got "
                        f"{type(batch).__name__}")
    if isinstance(pad_values, int) and not isinstance(pad_values, bool):
        pad_values = {"input_ids": pad_values}
    pads = {**_DEFAULT_PAD, **(pad_values or {})}
    T = seq_len(batch)
    if T is None:
        raise ValueError(f"pad_to: the batch has no 2-D {' / '.join(SEQ_KEYS)} to take the "
                         f"sequence length from (keys: {list(batch)})")
    if length < T:
        raise ValueError(f"pad_to: the batch is {T} long, more than length={length}; it is never "
                         "truncated")
    if length > T and "attention_mask" not in batch and isinstance(batch.get("input_ids"), Tensor):
        # the padded tokens must be masked (and out of the labels causal_lm_loss derives)
        batch = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    out = {}
    for k, t in batch.items():
        if length == T or not _paddable(batch, k, T):
            out[k] = t
            continue
        if k in pads:
            value = pads[k]
        elif k == "input_ids":
            raise ValueError("pad_to: input_ids need padding but no pad id was given: pass "
                             "pad_values={'input_ids': tokenizer.pad_token_id}")
        else:
            value = 0
        fill = t.new_full((t.shape[0], length - T), value)
        out[k] = torch.cat([t, fill], 1)
    return out


def pad_common(train: Any, val: Any, pad_values: Mapping[str, Any] | int | None = None) -> tuple[Any, Any]:
    """(train, val) with dict batches of different sequence lengths right-padded (pad_to) to the
    longer one; any other pair is returned as it is."""
    tt, tv = seq_len(train), seq_len(val)
    if tt is None or tv is None or tt == tv:
        return train, val
    T = max(tt, tv)
    return pad_to(train, T, pad_values), pad_to(val, T, pad_values)
