"""Per-sample losses for Hugging Face batch formats, ready to pass as `loss_fn`.

    ik.grad_dot(model, ik.causal_lm_loss, train_batch, val_batch)
    ik.InRunShapley(model, opt, ik.sequence_classification_loss, val_batch)

A batch is a dict as a tokenizer / data collator makes it (input_ids, attention_mask, labels,
...). Every key but `labels` is passed to the model; the model's own (batch-mean) loss is not
used. Both return one loss per row, [B], which is what the ghost engine needs: the mean of these
over a batch equals the model's own loss for one sample, and per-sample gradients are exact for
right-padded rows of different lengths (padded positions get no loss, so no gradient).
transformers itself is not imported here.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def _split(batch: Any) -> tuple[dict, Tensor | None]:
    if not isinstance(batch, dict):
        raise TypeError(f"expected a dict batch (input_ids, attention_mask, labels, ...), got "
                        f"{type(batch).__name__}")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch.get("labels")


def _logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned no logits ({type(out).__name__})")
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, T, V] logits, [B, T] labels (IGNORE_INDEX = no loss) -> mean over each row's labelled
    tokens, [B] (0 for a row without any)."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits.reshape(B * T, V), labels.reshape(B * T).to(logits.device),
                         ignore_index=IGNORE_INDEX, reduction="none").view(B, T)
    count = (labels != IGNORE_INDEX).sum(1).to(logits.device)
    return ce.sum(1) / count.clamp_min(1).to(ce.dtype)


def causal_lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """Next-token cross-entropy per sample, averaged over its labelled tokens: [B].

    labels default to input_ids with attention_mask == 0 positions ignored; labels are shifted
    here (position t predicts label t+1), as in Hugging Face's causal-LM loss."""
    inputs, labels = _split(batch)
    if labels is None:
        if "input_ids" not in inputs:
            raise ValueError("causal_lm_loss needs `labels` or `input_ids` in the batch")
        labels = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    logits = _logits(model(**inputs))
    return token_mean_cross_entropy(logits[:, :-1], labels[:, 1:])


def sequence_classification_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample loss of a *ForSequenceClassification model, [B], following its config's
    problem_type as Hugging Face does: regression (MSE), single-label (cross-entropy) or
    multi-label (binary cross-entropy, mean over labels)."""
    inputs, labels = _split(batch)
    if labels is None:
        raise ValueError("sequence_classification_loss needs `labels` in the batch")
    logits = _logits(model(**inputs))
    labels = labels.to(logits.device)
    num_labels = logits.shape[-1]
    problem = getattr(getattr(model, "config", None), "problem_type", None)
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        diff = (logits.squeeze(-1) if num_labels == 1 else logits) - labels.to(logits.dtype)
        sq = diff.square()
        return sq if num_labels == 1 else sq.reshape(sq.shape[0], -1).mean(1)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1), reduction="none")
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                  reduction="none").reshape(logits.shape[0], -1).mean(1)
    raise ValueError(f"unknown problem_type {problem!r}")


def __getattr__(name: str):
    """`ik.hf.InRunTrainer` (inrun_kernels/trainer.py) is imported on first use, so that importing
    this module never imports transformers."""
    if name == "InRunTrainer":
        from .trainer import InRunTrainer
        return InRunTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
