"""Error paths and crash safety (issue 9, items 3 and 5): crash-safe saves under kill -9, file
modes from the umask, ledgers of another num_samples, empty batches, train/val structure checks
and the padding of Hugging Face-style dict batches."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import inrun_kernels as ik
from inrun_kernels.batch import check_same_structure, concat, pad_common, pad_to, seq_len
from inrun_kernels.ledger import ValueLedger, atomic_save
from tests.models import MLP, ce_loss, make_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")


def _temps(folder, name="v.pt"):
    return sorted(f for f in os.listdir(folder) if f.startswith(f".{name}.") and f != name)


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)


# ---- crash-safe saves --------------------------------------------------------------------------
# One helper process imports torch once and forks a writer per round (a fresh interpreter per
# round would cost seconds each). Writers save ledger states k = 1, 2, ... in a loop (state k:
# every value and count equal to k) and are killed with SIGKILL; after each kill the test loads
# the file. Round 0 is deterministic: its writer blocks inside the save (in fsync, temp written
# and locked), so a temp is certainly left behind.
_KILLER = """
    import os, random, signal, sys, time
    import torch
    from inrun_kernels import ledger as L

    path, rounds, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)

    def state(k):
        led = L.ValueLedger(n)
        led.values.fill_(k)
        led.counts.fill_(k)
        return led

    t0 = time.perf_counter()
    state(0).save(path)
    dur = time.perf_counter() - t0

    def writer(r, wfd, block):
        if block:
            def stuck(fd):
                os.write(wfd, b"w")
                time.sleep(600)
            L.os.fsync = stuck
        k = 1 + 100000 * r
        while True:
            state(k).save(path)
            os.write(wfd, b"s")
            k += 1

    for r in range(rounds + 1):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                writer(r, wfd, r == 0)
            finally:
                os._exit(1)
        os.close(wfd)
        os.read(rfd, 1)                  # round 0: blocked in fsync; else: one complete save
        if r == 0:
            print("blocked", flush=True)
            sys.stdin.readline()
        else:
            time.sleep(rng.uniform(0, 3 * dur))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(rfd)
        print("killed", r, flush=True)
        sys.stdin.readline()
    print("done", flush=True)
"""


def _check_complete(path, n):
    state = torch.load(path, weights_only=True)
    v, c = state["values"], state["counts"]
    assert state["num_samples"] == n and v.shape == (n,) and c.shape == (n,)
    k = int(c[0])
    assert torch.equal(c, torch.full((n,), k)) and torch.equal(v, torch.full((n,), float(k), dtype=torch.float64))
    return k


@needs_fork
def test_saves_survive_kill_9_and_leave_no_temp_files(tmp_path):
    path, n, rounds = str(tmp_path / "v.pt"), 500_000, 20
    proc = _python(_KILLER, path, str(rounds), "1234", str(n))
    try:
        assert proc.stdout.readline().strip() == "blocked"
        # round 0: the writer holds its temp (written, locked) and is stuck in fsync; the file
        # at path is still the complete state 0. A save meanwhile must not take that live temp.
        assert _check_complete(path, n) == 0
        live = _temps(tmp_path)
        assert len(live) == 1 and live[0].endswith(".partial")
        atomic_save({"values": torch.zeros(n, dtype=torch.float64), "counts": torch.zeros(n, dtype=torch.long),
                     "num_samples": n}, path)
        assert _temps(tmp_path) == live
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["killed", "0"]
        assert _check_complete(path, n) == 0 and _temps(tmp_path) == live   # left by the kill
        left = 0   # kills that left a temp (most land mid-write; not asserted: timing)
        for r in range(1, rounds + 1):
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["killed", str(r)]
            k = _check_complete(path, n)           # loads, and is one complete state
            assert 100000 * r < k < 100000 * (r + 1)
            left += bool(_temps(tmp_path))
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    led = ValueLedger.load(path)
    led.add([3], torch.tensor([1.5]))
    led.save(path)                                # the next save cleans up every stale temp
    assert _temps(tmp_path) == [] and os.listdir(tmp_path) == ["v.pt"]
    assert ValueLedger.load(path).values[3] == led.values[3]


def test_stale_temps_of_other_targets_are_left_alone(tmp_path):
    for name in (".v.pt.inrun-tmp-abc.partial", ".w.pt.inrun-tmp-abc.partial", ".v.pt.inrun-tmp-x",
                 "notes.txt"):
        (tmp_path / name).write_bytes(b"junk")
    atomic_save([1, 2, 3], tmp_path / "v.pt")
    assert sorted(os.listdir(tmp_path)) == [".v.pt.inrun-tmp-x", ".w.pt.inrun-tmp-abc.partial",
                                            "notes.txt", "v.pt"]
    assert torch.load(tmp_path / "v.pt", weights_only=True) == [1, 2, 3]


_MODES = """
    import os, stat, sys, torch
    from inrun_kernels.ledger import ValueLedger, atomic_save
    folder = sys.argv[1]
    for mask in (0o022, 0o077, 0o002, 0o027):
        os.umask(mask)
        a, b = os.path.join(folder, f"a{mask:o}.pt"), os.path.join(folder, f"b{mask:o}.pt")
        atomic_save({"x": torch.ones(3)}, a)
        ValueLedger(4).save(b)
        print(f"{mask:o}", oct(stat.S_IMODE(os.stat(a).st_mode)), oct(stat.S_IMODE(os.stat(b).st_mode)))
"""


def test_saved_files_get_the_mode_the_umask_implies(tmp_path):
    proc = _python(_MODES, str(tmp_path))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    got = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    for mask in ("22", "77", "2", "27"):
        want = oct(0o666 & ~int(mask, 8))
        assert got[mask] == [want, want], (mask, got[mask])


def test_an_existing_files_mode_is_kept_and_symlinks_are_followed(tmp_path):
    path = tmp_path / "v.pt"
    atomic_save({"a": 1}, path)
    os.chmod(path, 0o640)
    atomic_save({"a": 2}, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "link.pt"
    os.symlink(path, link)
    ValueLedger(2).save(link)
    assert os.path.islink(link) and torch.load(path, weights_only=True)["num_samples"] == 2
    assert sorted(os.listdir(tmp_path)) == ["sub", "v.pt"] and os.listdir(tmp_path / "sub") == ["link.pt"]


def test_a_failing_save_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "v.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["v.pt"] and torch.load(path, weights_only=True) == {"a": 1}


# ---- ledgers of another size -------------------------------------------------------------------
def _ledger(n, ids=(1, 2), vals=(0.5, -1.0)):
    led = ValueLedger(n)
    led.add(list(ids), torch.tensor(vals))
    return led


def test_load_state_dict_with_another_num_samples_is_an_error_and_changes_nothing():
    led = _ledger(10)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in led.state_dict().items()}
    for other in (_ledger(12), _ledger(None)):
        with pytest.raises(ValueError, match=rf"num_samples={other.num_samples}\b.*num_samples=10\b"):
            led.load_state_dict(other.state_dict())
        after = led.state_dict()
        assert led.num_samples == 10 and torch.equal(after["values"], before["values"])
        assert torch.equal(after["counts"], before["counts"])
    led.load_state_dict(_ledger(10, ids=(7,), vals=(2.0,)).state_dict())
    assert led.values[7] == 2.0 and led.values[1] == 0


def test_a_ledger_made_with_num_samples_none_takes_any_state():
    for n in (None, 5, 12):
        led = ValueLedger()
        led.load_state_dict(_ledger(n).state_dict())
        assert led.num_samples == n and led.values[2] == -1.0


def test_an_inconsistent_ledger_state_is_an_error():
    state = _ledger(10).state_dict()
    state["num_samples"] = 11
    with pytest.raises(ValueError, match="num_samples=11 but holds 10"):
        ValueLedger().load_state_dict(state)


def test_engine_state_with_another_num_samples_is_an_error():
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, val = make_data(4, (17,), 5, seed=1), make_data(2, (17,), 5, seed=2)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=20)
    eng.step(train, [3, 1, 3, 0])
    opt.step()
    eng2 = ik.InRunShapley(model, opt, ce_loss, val, num_samples=30)
    with pytest.raises(ValueError, match="num_samples=20.*num_samples=30"):
        eng2.load_state_dict(eng.state_dict())
    assert eng2.steps == 0 and eng2.values.abs().sum() == 0 and eng2.values.shape == (30,)


# ---- empty batches -----------------------------------------------------------------------------
def test_empty_batches_are_clear_errors():
    model = MLP().double()
    train, val = make_data(4, (17,), 5, seed=1), make_data(2, (17,), 5, seed=2)
    empty = tuple(t[:0] for t in train)
    with pytest.raises(ValueError, match=r"training batch \(train\) is empty"):
        ik.grad_dot(model, ce_loss, empty, val)
    with pytest.raises(ValueError, match=r"validation batch \(val\) is empty"):
        ik.grad_dot(model, ce_loss, train, empty)
    with pytest.raises(ValueError, match=r"training batch \(train\) is empty"):
        ik.grad_gram(model, ce_loss, empty)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"validation batch \(val\) is empty"):
        ik.InRunShapley(model, opt, ce_loss, empty)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=10)
    with pytest.raises(ValueError, match=r"training batch \(train\) is empty"):
        eng.step(empty, [])
    assert all(p.grad is None for p in model.parameters())
    assert eng.steps == 0 and eng.counts.sum() == 0
    for batch in (torch.zeros(2, 3), {"input_ids": torch.zeros(2, 5, dtype=torch.long)}):
        empty = batch[:0] if isinstance(batch, torch.Tensor) else {k: v[:0] for k, v in batch.items()}
        with pytest.raises(ValueError, match=r"validation batch \(val\) is empty"):
            check_same_structure(batch, empty)
        with pytest.raises(ValueError, match=r"training batch \(train\) is empty"):
            check_same_structure(empty, batch)


# ---- train/val structure -----------------------------------------------------------------------
def _hf(B, T, seed=0, extra=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T - 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if extra:
        b["token_type_ids"] = torch.zeros(B, T, dtype=torch.long)
        b["score"] = torch.randn(B, generator=g)         # one per sample: not a sequence entry
        b["meta"] = "passed through"
    return b


def test_same_structure_accepts_what_concat_joins():
    x = torch.randn(4, 3, 5)
    check_same_structure(x, torch.randn(2, 3, 5))
    check_same_structure((x, torch.arange(4)), [torch.randn(1, 3, 5), torch.arange(1)])   # tuple vs list
    check_same_structure({"x": x, "k": 3}, {"x": x[:1], "k": 4})
    check_same_structure(_hf(4, 9), _hf(2, 9, seed=1))
    check_same_structure(_hf(4, 9), _hf(2, 6, seed=1))      # dict: sequence lengths may differ
    check_same_structure(_hf(2, 6), _hf(4, 9, seed=1))


@pytest.mark.parametrize("train,val,err,match", [
    (torch.randn(4, 3), torch.randn(2, 4), ValueError, r"train has shape \(4, 3\) but val has \(2, 4\)"),
    (torch.randn(4, 3), torch.randn(2, 3, 1), ValueError, "all dims but the first"),
    (torch.randn(4, 3), torch.randn(2, 3).double(), TypeError, "float32 but val is torch.float64"),
    (torch.randn(4, 3), (torch.randn(2, 3),), TypeError, "train is a Tensor but val is a tuple"),
    ((torch.randn(4, 3), torch.arange(4)), (torch.randn(2, 3),), ValueError, "2 entries but val has 1"),
    ((torch.randn(4, 3), "a"), (torch.randn(2, 3), torch.arange(2)), TypeError, r"train\[1\] is a str but val\[1\] is a Tensor"),
    ({"x": torch.randn(4, 3)}, {"y": torch.randn(2, 3)}, ValueError, r"different keys: \['x', 'y'\]"),
    ({"x": torch.randn(4, 3)}, (torch.randn(2, 3),), TypeError, "train is a dict but val is a tuple"),
    # a float [B, T] entry is not padded, so its length must agree
    ({"input_ids": torch.ones(4, 5, dtype=torch.long), "w": torch.randn(4, 5)},
     {"input_ids": torch.ones(2, 3, dtype=torch.long), "w": torch.randn(2, 3)}, ValueError, r"train\['w'\] has shape \(4, 5\)"),
    # in a tuple batch, no dim but the first may differ
    ((torch.ones(4, 5, dtype=torch.long),), (torch.ones(2, 3, dtype=torch.long),), ValueError, r"train\[0\] has shape"),
    # a [B, T, d] entry of a dict cannot be padded
    ({"input_ids": torch.ones(4, 5, dtype=torch.long), "emb": torch.randn(4, 5, 2)},
     {"input_ids": torch.ones(2, 3, dtype=torch.long), "emb": torch.randn(2, 3, 2)}, ValueError, r"train\['emb'\]"),
])
def test_same_structure_names_what_differs(train, val, err, match):
    with pytest.raises(err, match=match):
        check_same_structure(train, val)


def test_pad_to_pads_right_with_the_hf_values_and_returns_a_new_batch():
    b = _hf(3, 4)
    orig = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    p = pad_to(b, 7, {"input_ids": 0})
    assert p is not b and set(p) == set(b) and seq_len(p) == 7
    assert torch.equal(p["input_ids"], torch.cat([b["input_ids"], torch.zeros(3, 3, dtype=torch.long)], 1))
    assert torch.equal(p["attention_mask"][:, :4], b["attention_mask"]) and (p["attention_mask"][:, 4:] == 0).all()
    assert torch.equal(p["labels"][:, :4], b["labels"]) and (p["labels"][:, 4:] == -100).all()
    assert torch.equal(p["token_type_ids"], torch.zeros(3, 7, dtype=torch.long))
    assert p["score"] is b["score"] and p["meta"] == "passed through"
    assert all(p[k].dtype == b[k].dtype for k in ("input_ids", "attention_mask", "labels"))
    for k, v in orig.items():   # the input batch is untouched
        assert torch.equal(b[k], v) if isinstance(v, torch.Tensor) else b[k] == v
    # an int is the pad id; overrides per key; same length: a copy of the dict, same tensors
    assert (pad_to(b, 6, 50256)["input_ids"][:, 4:] == 50256).all()
    assert (pad_to(b, 6, {"input_ids": 2, "labels": -1})["labels"][:, 4:] == -1).all()
    same = pad_to(b, 4)
    assert same is not b and all(same[k] is b[k] for k in b)


def test_pad_to_errors():
    b = _hf(3, 4, extra=False)
    with pytest.raises(ValueError, match="no pad id"):
        pad_to(b, 6)
    with pytest.raises(ValueError, match="never truncated"):
        pad_to(b, 3, 0)
    with pytest.raises(TypeError, match="dict batches"):
        pad_to((b["input_ids"],), 6, 0)
    with pytest.raises(ValueError, match="sequence length"):
        pad_to({"x": torch.randn(3, 4)}, 6, 0)
    no_ids = {"attention_mask": b["attention_mask"], "labels": b["labels"]}
    assert pad_to(no_ids, 6)["labels"].shape == (3, 6)     # no input_ids: no pad id needed


def test_pad_common_makes_the_pair_joinable():
    tr, va = _hf(4, 9), _hf(2, 6, seed=1)
    with pytest.raises(ValueError, match="pad to a common length"):
        concat(tr, va)
    for a, b in ((tr, va), (va, tr)):
        pa, pb = pad_common(a, b, {"input_ids": 0})
        assert seq_len(pa) == seq_len(pb) == 9
        both = concat(pa, pb)
        assert both["input_ids"].shape == (a["input_ids"].shape[0] + b["input_ids"].shape[0], 9)
    same_a, same_b = pad_common(tr, _hf(2, 9, seed=1))
    assert same_a is tr
    x, y = torch.randn(2, 3), torch.randn(1, 3)
    assert pad_common(x, y) == (x, y)
