"""Hugging Face Trainer integration (issue 10, item 4): ik.hf.InRunTrainer end to end on a tiny
randomly initialised GPT-2 trained on a real text (the docstrings of standard-library modules,
one token per byte), against an independent float64 oracle of every global step: the same
batches in the same order (the dataset logs the rows the Trainer's sampler asks for), per-sample
gradients of an unpatched float64 copy by a batch-size-1 loop with the model's OWN loss, the
Trainer's clipping factor, the optimizer stepped by torch on the float64 copy, and the README's
first-order value (lr / global batch) * c * <g_i, g_val> summed over the steps."""
import copy
import importlib
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import inrun_kernels as ik

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

T = 24            # bytes per row
N_TRAIN = 20      # rows: 5 batches of 4 -> windows of 2, 2 and 1 micro-batches under accumulation 2
N_VAL = 3
MODULES = ("json", "collections", "functools", "argparse", "textwrap", "string", "inspect", "typing")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is as fast and does not spin against other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def corpus() -> bytes:
    docs = [importlib.import_module(m).__doc__ for m in MODULES]
    if any(d is None for d in docs):
        pytest.skip("docstrings stripped (python -OO)")
    return "\n".join(docs).encode()


def make_rows():
    """Training rows (ids in a column, deliberately not the positions, plus an unused string
    column the Trainer drops) and validation rows, from disjoint parts of the text."""
    text = corpus()
    rows = []
    for i in range(N_TRAIN):
        chunk = list(text[i * T:(i + 1) * T])
        rows.append({"input_ids": chunk, "labels": chunk, "idx": (7 * i + 3) % N_TRAIN, "source": "stdlib"})
    off = len(text) // 2
    val = [{"input_ids": list(text[off + j * T:off + (j + 1) * T])} for j in range(N_VAL)]
    for r in val:
        r["labels"] = r["input_ids"]
    return rows, val


class Logged(torch.utils.data.Dataset):
    """The rows; remembers which positions the Trainer's sampler asked for, in order."""

    def __init__(self, rows, drop=()):
        self.rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
        self.log: list[int] = []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.log.append(int(i))
        return self.rows[i]


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=T, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def targs(out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=4, optim="sgd",
                learning_rate=0.2, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


# ---- the float64 oracle --------------------------------------------------------------------------
def _flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)])


def _own_loss(model, row):
    """The model's own causal-LM loss of one row (token mean): no inrun_kernels code."""
    x = torch.tensor([row["input_ids"]])
    return model(input_ids=x, labels=torch.tensor([row["labels"]])).loss


def oracle(model0, rows, val, steps, *, lr, max_grad_norm, optimizer="sgd", world=1, id_key="idx",
           estimator="first", lrs=None):
    """steps: per optimizer step, per rank, the micro-batches' row positions. Returns (values
    [N], counts [N], the float64 model after the steps, the clipping factors). Values: the
    README's SGD-form first order, (lr / N) c <g_i, g_val>, or (SGD only) the midpoint rule,
    (lr / N) c <g_i, grad L_val(w - lr c g_bar / 2)>. lrs: the lr of each step (a schedule)."""
    m = copy.deepcopy(model0).double()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    values = torch.zeros(N_TRAIN, dtype=torch.float64)
    counts = torch.zeros(N_TRAIN, dtype=torch.long)
    factors = []
    for t, per_rank in enumerate(steps):
        if lrs is not None:
            lr = lrs[t]
            for group in opt.param_groups:
                group["lr"] = lr
        k = len(per_rank[0])
        shares, ids = [], []
        for micro in (mb for rank in per_rank for mb in rank):
            for pos in micro:
                row = rows[pos]
                shares.append(_flat_grad(m, _own_loss(m, row)) / (world * k * len(micro)))
                ids.append(row[id_key] if id_key else pos)
        x = torch.stack(shares)                       # sample shares of the applied update
        g = x.sum(0)                                  # the global (mean) training gradient
        c = min(1.0, max_grad_norm / (float(g.norm()) + 1e-6)) if max_grad_norm > 0 else 1.0
        factors.append(c)
        shift = -lr * c * g / 2 if estimator == "midpoint" else torch.zeros_like(g)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) + shift, params)
        g_val = sum(_flat_grad(m, _own_loss(m, r)) for r in val) / len(val)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) - shift, params)
        ids = torch.tensor(ids)
        values.index_add_(0, ids, lr * c * (x @ g_val))
        counts.index_add_(0, ids, torch.ones_like(ids))
        off = 0
        for p in params:
            p.grad = (c * g[off:off + p.numel()]).view_as(p).clone()
            off += p.numel()
        opt.step()
        opt.zero_grad()
    return values, counts, m, factors


def windows(log, bs, k, per_epoch):
    """The logged positions as optimizer steps of micro-batches (one rank): each epoch's
    batches in windows of k, the last window of an epoch shorter if the batches do not divide."""
    batches = [log[i:i + bs] for i in range(0, len(log), bs)]
    steps = []
    for e in range(0, len(batches), per_epoch):
        ep = batches[e:e + per_epoch]
        steps += [[ep[i:i + k]] for i in range(0, len(ep), k)]
    return steps


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def check_params(trained: dict, ref, start, tol):
    """Every parameter's change by the training (trained: name -> tensor) against the oracle's,
    to `tol`, up to the float32 rounding of the parameter itself (1e-6 of its norm)."""
    for (n, q), p0 in zip(ref.named_parameters(), start.parameters()):
        p, q, p0 = trained[n].detach().double(), q.detach(), p0.detach().double()
        assert float((p - q).norm()) <= tol * float((q - p0).norm()) + 1e-6 * float(q.norm()), n


def stack(rows, positions):
    """The rows as one batch, as the default data collator makes it."""
    return {k: torch.tensor([rows[i][k] for i in positions]) for k in ("input_ids", "labels")}


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator,checkpointing", [("first", False), ("midpoint", True)])
def test_values_match_the_oracle_with_accumulation_and_clipping(tmp_path, estimator, checkpointing):
    """SGD, gradient_accumulation_steps=2 over 5 batches an epoch (windows of 2, 2 and a last
    one of 1), 2 epochs, max_grad_norm small enough to clip every step; ids from a column that
    is not the position and that the Trainer's remove_unused_columns would drop. midpoint (its
    validation pass runs at commit, in the optimizer step pre-hook) with the Trainer's
    activation checkpointing (non-reentrant)."""
    rows, val = make_rows()
    model = tiny_gpt2()
    model0 = copy.deepcopy(model)
    data = Logged(rows)
    args = targs(tmp_path, gradient_accumulation_steps=2, num_train_epochs=2, max_grad_norm=0.3,
                 activation_checkpointing=checkpointing)
    tr = ik.hf.InRunTrainer(model=model, args=args, train_dataset=data, inrun_val_dataset=val,
                            inrun_id_column="idx", inrun_estimator=estimator)
    tr.train()
    assert model.is_activation_checkpointing == checkpointing
    steps = windows(data.log, 4, 2, per_epoch=5)
    assert [len(s[0]) for s in steps] == [2, 2, 1, 2, 2, 1] and tr.state.global_step == 6
    values, counts, ref, factors = oracle(model0, rows, val, steps, lr=0.2, max_grad_norm=0.3,
                                          estimator=estimator)
    assert max(factors) < 0.9   # clipping is active on every step
    assert tr.inrun.steps == 6
    assert torch.equal(tr.inrun.counts, counts) and torch.equal(counts, torch.full((N_TRAIN,), 2))
    assert rel(tr.inrun_values, values) <= 1e-6
    check_params(dict(model.named_parameters()), ref, model0, 1e-5)   # float32 parameters
    saved = torch.load(os.path.join(tmp_path, "inrun_values.pt"), weights_only=True)
    assert torch.equal(saved["ledger"]["values"], tr.inrun_values)


def test_positions_as_ids_default_adamw_and_no_clipping(tmp_path):
    """No id column (ids = positions in train_dataset), the Trainer's default optimizer (fused
    AdamW) valued with update="sgd" (the paper's proxy: (lr / N) <g_i, g_val>, exact for any
    optimizer), max_grad_norm=0 (no clipping), no accumulation."""
    rows, val = make_rows()
    model = tiny_gpt2(1)
    model0 = copy.deepcopy(model)
    data = Logged(rows, drop=("idx",))
    args = targs(tmp_path, optim=TrainingArguments(output_dir=str(tmp_path)).optim, learning_rate=1e-3,
                 max_steps=3, max_grad_norm=0.0)
    tr = ik.hf.InRunTrainer(model=model, args=args, train_dataset=data, inrun_update="sgd",
                            inrun_val_dataset=stack(val, range(N_VAL)),   # one collated batch
                            inrun_verify=False)
    tr.train()
    values, counts, ref, _ = oracle(model0, rows, val, windows(data.log[:12], 4, 1, per_epoch=5),
                                    lr=1e-3, max_grad_norm=0.0, optimizer="adamw", id_key=None)
    assert torch.equal(tr.inrun.counts, counts)
    assert rel(tr.inrun_values, values) <= 1e-6
    # Adam's g / sqrt(v) amplifies the float32 rounding of tiny gradient entries
    check_params(dict(model.named_parameters()), ref, model0, 1e-3)


def test_the_default_linear_schedule_is_followed(tmp_path):
    """lr_scheduler_type="linear" (the Trainer's default): the lr falls at every optimizer step
    (lr (1 - t / T) over T = 5 steps) and each step's values use that step's lr."""
    rows, val = make_rows()
    model = tiny_gpt2(2)
    model0 = copy.deepcopy(model)
    data = Logged(rows, drop=("idx",))
    args = targs(tmp_path, lr_scheduler_type="linear", max_steps=5, max_grad_norm=0.0)
    tr = ik.hf.InRunTrainer(model=model, args=args, train_dataset=data, inrun_val_dataset=val,
                            inrun_verify=False)
    tr.train()
    lrs = [0.2 * (1 - t / 5) for t in range(5)]
    values, counts, ref, _ = oracle(model0, rows, val, windows(data.log[:20], 4, 1, per_epoch=5),
                                    lr=0.2, max_grad_norm=0.0, id_key=None, lrs=lrs)
    assert torch.equal(tr.inrun.counts, counts)
    assert rel(tr.inrun_values, values) <= 1e-6
    constant, *_ = oracle(model0, rows, val, windows(data.log[:20], 4, 1, per_epoch=5),
                          lr=0.2, max_grad_norm=0.0, id_key=None)
    assert rel(tr.inrun_values, constant) > 1e-2      # the schedule matters
    check_params(dict(model.named_parameters()), ref, model0, 1e-5)


def test_default_optimizer_aware_values_as_the_engine_by_hand(tmp_path):
    """The defaults (fused AdamW, update="optimizer", max_grad_norm=1.0): the Trainer's values are
    those of InRunShapley driven by hand on a copy of the model with the same batches, optimizer
    and clipping (the integration adds nothing and loses nothing)."""
    rows, val = make_rows()
    model = tiny_gpt2(5)
    hand = copy.deepcopy(model)
    data = Logged(rows)
    args = targs(tmp_path, optim=TrainingArguments(output_dir=str(tmp_path)).optim, learning_rate=1e-3,
                 max_steps=3, gradient_accumulation_steps=2)
    tr = ik.hf.InRunTrainer(model=model, args=args, train_dataset=data, inrun_val_dataset=val,
                            inrun_id_column="idx", inrun_verify=False)
    tr.train()
    opt = torch.optim.AdamW(hand.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    eng = ik.InRunShapley(hand, opt, ik.causal_lm_loss, stack(val, range(N_VAL)), N_TRAIN,
                          accumulation_steps=2, verify=False)
    for (window,) in windows(data.log[:24], 4, 2, per_epoch=5)[:3]:
        eng.accumulation_steps = len(window)
        for micro in window:
            eng.step(stack(rows, micro), torch.tensor([rows[i]["idx"] for i in micro]))
        torch.nn.utils.clip_grad_norm_(hand.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    assert torch.equal(tr.inrun.counts, eng.counts)
    assert rel(tr.inrun_values, eng.values) <= 1e-6
    for (n, p), q in zip(model.named_parameters(), hand.parameters()):
        assert rel(p, q) <= 1e-6, n


def test_checkpoints_hold_the_values_and_resume_loads_them(tmp_path):
    rows, val = make_rows()
    model = tiny_gpt2(2)
    start = copy.deepcopy(model.state_dict())
    model0 = copy.deepcopy(model)
    data = Logged(rows)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, max_grad_norm=1.0)
    tr = ik.hf.InRunTrainer(model=model, args=targs(tmp_path, **kw), train_dataset=data,
                            inrun_val_dataset=val, inrun_id_column="idx", inrun_verify=False)
    tr.train()
    at2 = torch.load(tmp_path / "checkpoint-2" / "inrun_values.pt", weights_only=True)
    values2, counts2, _, _ = oracle(model0, rows, val, windows(data.log[:8], 4, 1, 5), lr=0.2,
                                    max_grad_norm=1.0)
    assert at2["steps"] == 2 and torch.equal(at2["ledger"]["counts"], counts2)
    assert rel(at2["ledger"]["values"], values2) <= 1e-6
    full = tr.inrun_values.clone()

    fresh = tiny_gpt2(2)
    fresh.load_state_dict(start)   # resume loads the checkpoint's weights anyway
    tr2 = ik.hf.InRunTrainer(model=fresh, args=targs(tmp_path, **kw), train_dataset=Logged(rows),
                             inrun_val_dataset=val, inrun_id_column="idx", inrun_verify=False)
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert tr2.inrun.steps == 4
    assert torch.equal(tr2.inrun.counts, tr.inrun.counts)
    assert rel(tr2.inrun_values, full) <= 1e-6

    os.remove(tmp_path / "checkpoint-2" / "inrun_values.pt")   # a checkpoint without values
    tr3 = ik.hf.InRunTrainer(model=tiny_gpt2(2), args=targs(tmp_path, **kw), train_dataset=Logged(rows),
                             inrun_val_dataset=val, inrun_id_column="idx", inrun_verify=False)
    with pytest.raises(FileNotFoundError, match="holds no inrun_values.pt"):
        tr3.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_bf16_autocast_on_cpu(tmp_path):
    rows, val = make_rows()
    model = tiny_gpt2(3)
    model0 = copy.deepcopy(model)
    data = Logged(rows)
    args = targs(tmp_path, bf16=True, max_steps=2, gradient_accumulation_steps=2, max_grad_norm=0.3)
    tr = ik.hf.InRunTrainer(model=model, args=args, train_dataset=data, inrun_val_dataset=val,
                            inrun_id_column="idx")
    tr.train()
    assert tr.accelerator.mixed_precision == "bf16"
    values, counts, _, _ = oracle(model0, rows, val, windows(data.log[:16], 4, 2, 5), lr=0.2,
                                  max_grad_norm=0.3)
    assert torch.equal(tr.inrun.counts, counts)
    err = rel(tr.inrun_values, values)
    print("bf16 rel err", err)
    assert err <= 1e-2, err


def test_refused_setups_and_missing_ids(tmp_path):
    rows, val = make_rows()
    with pytest.raises(ValueError, match="inrun_val_dataset"):
        ik.hf.InRunTrainer(model=tiny_gpt2(), args=targs(tmp_path), train_dataset=rows)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        ik.hf.InRunTrainer(model=tiny_gpt2(), args=targs(tmp_path, label_smoothing_factor=0.1),
                           train_dataset=rows, inrun_val_dataset=val)
    tr = ik.hf.InRunTrainer(model=tiny_gpt2(), args=targs(tmp_path, max_steps=1), train_dataset=rows,
                            inrun_val_dataset=val, inrun_id_column="row_id")
    with pytest.raises(ValueError, match="no id column 'row_id'"):
        tr.train()
    tr = ik.hf.InRunTrainer(model=tiny_gpt2(), args=targs(tmp_path, max_steps=1, optim="adagrad"),
                            train_dataset=rows, inrun_val_dataset=val, inrun_id_column="idx")
    with pytest.raises(ik.UnsupportedOptimizerError):
        tr.train()


def test_importing_inrun_kernels_does_not_import_transformers():
    code = ("import sys, inrun_kernels as ik; assert 'transformers' not in sys.modules; "
            "T = ik.hf.InRunTrainer; from inrun_kernels.trainer import InRunTrainer; "
            "assert T is InRunTrainer and issubclass(T, sys.modules['transformers'].Trainer)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- two processes (DDP through the Trainer, gloo on CPU) -----------------------------------------
DDP = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1,
           max_grad_norm=0.3, ddp_backend="gloo")


def _ddp_worker(out: str) -> None:
    """One rank, run by test_ddp_two_processes in a process of its own (torchrun's env vars)."""
    rank = int(os.environ["RANK"])
    rows, val = make_rows()
    model = tiny_gpt2(4)
    data = Logged(rows)
    tr = ik.hf.InRunTrainer(model=model, args=targs(os.path.join(out, "run"), **DDP), train_dataset=data,
                            inrun_val_dataset=val, inrun_id_column="idx", inrun_verify=False)
    tr.train()
    assert type(tr.model_wrapped).__name__ == "DistributedDataParallel", type(tr.model_wrapped)
    torch.save({"values": tr.inrun_values, "counts": tr.inrun.counts, "log": data.log,
                "steps": tr.state.global_step,
                "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
               os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out, world=2, limit=240.0):
    """Starts `world` worker processes with torchrun's environment; waits for all of them (a
    rank that fails stops the others, which would wait for it in a collective)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = str(_free_port())
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        code = f"from tests.test_trainer import _ddp_worker; _ddp_worker({str(out)!r})"
        logs.append(open(os.path.join(out, f"rank{rank}.log"), "w"))
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        end = time.monotonic() + limit
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    for rank, p in enumerate(procs):
        with open(os.path.join(out, f"rank{rank}.log")) as f:
            assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{f.read()[-4000:]}"


@pytest.mark.slow
def test_ddp_two_processes_value_the_global_batch(tmp_path):
    """accelerate/torchrun-style launch of 2 processes (gloo, CPU): on both ranks the values are
    the single-process float64 oracle's of the global batch (both ranks' micro-batches, the
    gradient averaged over the ranks), every rank's samples in every rank's ledger; rank 0
    saves them."""
    _run_ranks(tmp_path)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert res[0]["steps"] == res[1]["steps"] == 3   # 10 batches of 2 -> 5 per rank -> windows 2, 2, 1
    per_rank = [windows(r["log"][:10], 2, 2, per_epoch=5) for r in res]
    steps = [[per_rank[0][t][0], per_rank[1][t][0]] for t in range(3)]
    assert sorted(i for s in steps for rk in s for mb in rk for i in mb) == list(range(N_TRAIN))
    rows, val = make_rows()
    model0 = tiny_gpt2(4)
    values, counts, ref, factors = oracle(model0, rows, val, steps, lr=0.2, max_grad_norm=0.3, world=2)
    assert max(factors) < 0.9
    for r in res:
        assert torch.equal(r["counts"], counts)
        assert rel(r["values"], values) <= 1e-6
        check_params(r["params"], ref, model0, 1e-5)
    saved = torch.load(tmp_path / "run" / "inrun_values.pt", weights_only=True)
    assert torch.equal(saved["ledger"]["values"], res[0]["values"])
