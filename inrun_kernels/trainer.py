"""Hugging Face Trainer integration: In-Run Data Shapley values of a `Trainer` run.

    from inrun_kernels.hf import InRunTrainer          # instead of transformers.Trainer
    trainer = InRunTrainer(model=model, args=args, train_dataset=train,
                           inrun_val_dataset=val)       # the one new argument
    trainer.train()
    trainer.inrun_values        # float64 [len(train)]; > 0 = the sample lowered the validation loss

Why a Trainer subclass and not a callback: the values come out of the training step's own
forward and backward (the engine runs them, with the validation rows joined, inside a ghost
session), and no TrainerCallback event wraps the forward/backward. `InRunTrainer` overrides only
`training_step` (the forward+backward goes through `InRunShapley.step`), the training dataloader
(each row carries its id to the step, never to the model), `_save_checkpoint` and `train`; the
accumulation loop, `no_sync`, gradient clipping, the optimizer and scheduler steps, logging,
evaluation and checkpointing stay the Trainer's own.

What the model trains on: the mean over the micro-batch of each sample's loss (for a causal LM:
each sample's loss is the mean over its own labelled tokens, `ik.causal_lm_loss`), divided by the
number of micro-batches of the optimizer step; this is the gradient the values split into
per-sample shares. It is NOT the Trainer's default token-count normalisation
(`num_items_in_batch`: every token of the accumulated batch weighs the same), which does not
split into per-sample means; with rows of equal label counts the two are the same.

Ids: `inrun_id_column="idx"` takes each row's id from that column (kept through
`remove_unused_columns`, removed before the data collator, never passed to the model);
`inrun_id_column=None` (default) uses the row's position in `train_dataset` (the sampler's index).

Saved: `<checkpoint>/inrun_values.pt` with every checkpoint (written before the Trainer's own
files, so a checkpoint folder that holds trainer_state.json holds the values too) and
`<output_dir>/inrun_values.pt` when `train()` returns (`InRunShapley.load` or
`torch.load(path)["ledger"]["values"]` read them). `train(resume_from_checkpoint=...)` loads the
checkpoint's values; a checkpoint without them is an error (the values of its steps are lost).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .estimators import ESTIMATORS
from .hf import causal_lm_loss, sequence_classification_loss
from .shapley import InRunShapley
from .updates import UPDATES

VALUES_NAME = "inrun_values.pt"
_IDS = "__inrun_ids__"   # the collated batch's key for the ids (popped before the model sees it)


class _Positions(torch.utils.data.Dataset):
    """train_dataset whose rows (mappings) also carry their position under _IDS."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        row = self.dataset[i]
        if not isinstance(row, Mapping):
            raise TypeError(f"InRunTrainer: train_dataset rows must be mappings (dicts of features), "
                            f"row {i} is a {type(row).__name__}")
        return {**row, _IDS: i}


class _IdCollator:
    """Takes the id out of every row, collates the rest with the Trainer's collator and puts the
    ids (a CPU LongTensor) into the batch under _IDS."""

    def __init__(self, collator: Callable, key: str):
        self.collator, self.key = collator, key

    def __call__(self, features: list) -> Any:
        ids, rows = [], []
        for f in features:
            if not isinstance(f, Mapping) or self.key not in f:
                what = "column" if self.key != _IDS else "position"
                raise ValueError(f"InRunTrainer: a training row has no id {what} {self.key!r} (keys "
                                 f"{sorted(f) if isinstance(f, Mapping) else type(f).__name__}); pass "
                                 "inrun_id_column=<the column holding each row's id>, or None to use "
                                 "the row's position in train_dataset")
            i = f[self.key]
            ids.append(int(i.item() if isinstance(i, Tensor) else i))
            rows.append({k: v for k, v in f.items() if k != self.key})
        batch = self.collator(rows)
        if not isinstance(batch, dict):   # BatchEncoding is a dict
            raise TypeError(f"InRunTrainer: the data collator returned a {type(batch).__name__}; "
                            "a dict batch (input_ids, attention_mask, labels, ...) is needed")
        batch[_IDS] = torch.tensor(ids, dtype=torch.long)
        return batch


# the Trainer internals InRunTrainer builds on (transformers 5.x)
_TRAINER_API = ("_get_dataloader", "_set_signature_columns_if_needed", "_get_collator_with_removed_columns",
                "_save_checkpoint", "_get_output_dir", "get_batch_samples")


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (its step pre-hooks run)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class InRunTrainer(Trainer):
    """transformers.Trainer that computes In-Run Data Shapley values of every training sample
    while it trains (module docstring: what the model trains on, ids, files).

    inrun_val_dataset: rows as the training rows (the data collator batches them, unused columns
    removed) or one collated batch (a dict of tensors); the values measure the MEAN validation
    loss over it. inrun_loss_fn(model, batch) -> per-sample losses [B]; default
    `ik.causal_lm_loss` for causal LMs and `ik.sequence_classification_loss` for sequence
    classifiers (the model's own loss for one sample). inrun_estimator / inrun_update /
    inrun_verify: InRunShapley's estimator / update / verify. inrun_id_column: the column holding
    each row's id, or None for its position in train_dataset. inrun_num_samples: the ledger size
    (default len(train_dataset)).

    Works with gradient_accumulation_steps (the last, shorter window of an epoch is weighted as
    the Trainer weights it), max_grad_norm (values follow the clipping), bf16 autocast, and
    several processes (accelerate launch / torchrun: DDP, values of the global batch on every
    rank). Not supported (an error at construction): DeepSpeed, FSDP, fp16 (loss scaling
    with skipped steps), DataParallel over several GPUs of one process, label smoothing,
    compute_loss_func, NEFTune, torch_compile, LOMO optimizers. A subclass's compute_loss is not
    used (the loss is inrun_loss_fn)."""

    def __init__(self, *args, inrun_val_dataset: Any = None, inrun_loss_fn: Callable | None = None,
                 inrun_estimator: str = "first", inrun_update: str = "optimizer",
                 inrun_id_column: str | None = None, inrun_num_samples: int | None = None,
                 inrun_verify: bool = True, **kwargs):
        if inrun_val_dataset is None:
            raise ValueError("InRunTrainer needs inrun_val_dataset=: the validation rows (or one collated "
                             "batch) whose mean loss the values measure")
        super().__init__(*args, **kwargs)
        self.inrun_val_dataset = inrun_val_dataset
        self.inrun_loss_fn = inrun_loss_fn
        self.inrun_estimator = inrun_estimator
        self.inrun_update = inrun_update
        self.inrun_id_column = inrun_id_column
        self.inrun_num_samples = inrun_num_samples
        self.inrun_verify = inrun_verify
        self.inrun: InRunShapley | None = None   # the engine of the current / last train() call
        self._inrun_resume: str | None = None
        if inrun_estimator not in ESTIMATORS:
            raise ValueError(f"inrun_estimator must be one of {ESTIMATORS}, got {inrun_estimator!r}")
        if inrun_update not in UPDATES:
            raise ValueError(f"inrun_update must be one of {UPDATES}, got {inrun_update!r}")
        self._inrun_check_setup()
        if type(self).compute_loss is not Trainer.compute_loss:
            warnings.warn("InRunTrainer: the overridden compute_loss is not used for training; the "
                          "training loss is inrun_loss_fn (per sample, averaged)", stacklevel=2)

    # ---- what is refused --------------------------------------------------------------------
    def _inrun_check_setup(self) -> None:
        missing = [f for f in _TRAINER_API if not hasattr(Trainer, f)]
        if missing:
            import transformers
            raise ImportError(f"InRunTrainer needs transformers >= 5 (tested with 5.24); this "
                              f"transformers {transformers.__version__} Trainer lacks {missing}")
        args, bad = self.args, []
        if self.is_deepspeed_enabled:
            bad.append("DeepSpeed (it owns the backward and the gradients)")
        if self.is_fsdp_enabled:
            bad.append("FSDP through the Trainer")
        if args.fp16:
            bad.append("fp16=True (a loss scaler whose skipped steps and scaling bypass the values); use "
                       "bf16=True")
        if args.n_gpu > 1:
            bad.append(f"DataParallel over {args.n_gpu} GPUs in one process (launch one process per GPU "
                       "with accelerate launch / torchrun instead)")
        if args.label_smoothing_factor:
            bad.append("label_smoothing_factor (the loss is inrun_loss_fn)")
        if self.compute_loss_func is not None:
            bad.append("compute_loss_func (pass a per-sample inrun_loss_fn instead)")
        if self.neftune_noise_alpha is not None:
            bad.append("neftune_noise_alpha (the noise would reach the validation rows)")
        if args.torch_compile:
            bad.append("torch_compile=True")
        if str(getattr(args, "optim", "")).lower().endswith("lomo"):
            bad.append(f"optim={args.optim} (LOMO steps inside the backward)")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and any(getattr(pc, f"{k}_enabled", False) for k in ("dp_shard", "tp", "cp", "sp")):
            bad.append("sharded data / tensor / context / sequence parallelism (parallelism_config)")
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset) and not self.inrun_id_column:
            bad.append("an IterableDataset without inrun_id_column (its rows have no positions)")
        if bad:
            raise ValueError("InRunTrainer does not support " + "; ".join(bad))

    # ---- data -------------------------------------------------------------------------------
    def get_train_dataloader(self):
        """The Trainer's training dataloader; every row's id travels beside the batch (under a
        key the Trainer's column removal keeps and training_step pops) and never reaches the
        data collator or the model."""
        if self.train_dataset is None:
            return super().get_train_dataloader()   # the Trainer's error
        key = self.inrun_id_column or _IDS
        dataset = self.train_dataset if self.inrun_id_column else _Positions(self.train_dataset)
        self._set_signature_columns_if_needed()
        signature, collator = self._signature_columns, self.data_collator
        self._signature_columns = list(signature) + [key]   # the column removal keeps the id
        self.data_collator = _IdCollator(collator, key)
        try:
            return self._get_dataloader(dataset=dataset, description="Training",
                                        batch_size=self._train_batch_size,
                                        sampler_fn=self._get_train_sampler, is_training=True)
        finally:
            self._signature_columns, self.data_collator = signature, collator

    def _inrun_val_batch(self) -> dict:
        val = self.inrun_val_dataset
        if isinstance(val, Mapping):   # one collated batch already
            batch = dict(val)
        else:
            rows = [val[i] for i in range(len(val))]
            if self.inrun_id_column:
                rows = [{k: v for k, v in r.items() if k != self.inrun_id_column} for r in rows]
            collate = self._get_collator_with_removed_columns(self.data_collator, "InRun validation")
            batch = collate(rows)
        return self._prepare_inputs(batch)

    def _inrun_loss(self, model) -> Callable:
        if self.inrun_loss_fn is not None:
            return self.inrun_loss_fn
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
        inner = self.accelerator.unwrap_model(model)
        base = getattr(getattr(inner, "base_model", None), "model", None)   # PEFT
        names = {type(inner).__name__, type(base).__name__ if base is not None else ""}
        if names & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            return causal_lm_loss
        if names & set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
            return sequence_classification_loss
        raise ValueError(f"InRunTrainer: no default per-sample loss for {type(inner).__name__}; pass "
                         "inrun_loss_fn=lambda model, batch: <losses [B], one per row>")

    # ---- the engine ---------------------------------------------------------------------------
    def _inrun_start(self, model) -> InRunShapley:
        """Built at the first training step: the optimizer and the DDP wrapping exist then."""
        self._inrun_check_setup()
        num_samples = self.inrun_num_samples
        if num_samples is None:
            try:
                num_samples = len(self.train_dataset)
            except TypeError:
                raise ValueError("InRunTrainer: train_dataset has no length; pass inrun_num_samples= "
                                 "(1 + the largest id)") from None
        eng = InRunShapley(model, _torch_optimizer(self.optimizer), self._inrun_loss(model),
                           self._inrun_val_batch(), num_samples, estimator=self.inrun_estimator,
                           update=self.inrun_update, verify=self.inrun_verify,
                           accumulation_steps=self.args.gradient_accumulation_steps)
        if self._inrun_resume is not None:
            path = os.path.join(self._inrun_resume, VALUES_NAME)
            if not os.path.isfile(path):
                eng.close()
                raise FileNotFoundError(
                    f"InRunTrainer: resuming from {self._inrun_resume}, which holds no {VALUES_NAME}: the "
                    "values of the steps before it are not known. Resume from a checkpoint InRunTrainer "
                    "wrote, or start without resume_from_checkpoint")
            eng.load(path)
            if eng.steps != self.state.global_step:
                warnings.warn(f"InRunTrainer: {path} holds {eng.steps} steps, the checkpoint's trainer "
                              f"state {self.state.global_step}", stacklevel=2)
        return eng

    def training_step(self, model, inputs, num_items_in_batch=None) -> Tensor:
        """One micro-batch: forward + backward through InRunShapley.step (inside the Trainer's
        no_sync context). .grad gains mean(per-sample losses) / (micro-batches of this optimizer
        step); the returned (logged) loss is that scaled loss, as the Trainer's."""
        if not isinstance(inputs, dict) or _IDS not in inputs:
            raise RuntimeError("InRunTrainer.training_step: the batch carries no sample ids; it must come "
                               "from InRunTrainer.get_train_dataloader")
        inputs = dict(inputs)
        ids = inputs.pop(_IDS)
        if self.inrun is None:
            self.inrun = self._inrun_start(model)
        eng = self.inrun
        k = self.current_gradient_accumulation_steps
        if eng.micro_batches_pending == 0:   # the first micro-batch of an optimizer step: its window size
            eng.accumulation_steps = k
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # accelerate runs the forward under autocast (bf16) by wrapping model.forward; entering the
        # same autocast here too lets the engine (ik.verify's precision) see it
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss = eng.step(inputs, ids)
        return (loss / k).detach().to(self.args.device)

    # ---- saving -------------------------------------------------------------------------------
    @property
    def inrun_values(self) -> Tensor | None:
        """float64 [num_samples]: each sample's value summed over the steps so far (None before
        the first step)."""
        return None if self.inrun is None else self.inrun.values

    def _save_checkpoint(self, model, trial) -> None:
        if self.inrun is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.inrun.save(os.path.join(folder, VALUES_NAME))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer.train; the values start from the checkpoint's when resuming, else from zero,
        and are saved to output_dir/inrun_values.pt at the end."""
        if resume_from_checkpoint is True:
            last = get_last_checkpoint(self.args.output_dir)
            resume_from_checkpoint = last if last is not None else True   # None: the Trainer's error
        self._inrun_resume = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        if self.inrun is not None:
            self.inrun.close()
        self.inrun = None
        try:
            out = super().train(resume_from_checkpoint or None, *args, **kwargs)
        finally:
            if self.inrun is not None:
                self.inrun.close()
        if self.inrun is not None and self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            self.inrun.save(os.path.join(self.args.output_dir, VALUES_NAME))
        return out
