"""ik.Values (results.py) and the report (report.py, `python -m inrun_kernels report`)."""
import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import inrun_kernels as ik
from inrun_kernels import results
from inrun_kernels.cli import _values_report
from inrun_kernels.ledger import ValueLedger, atomic_save
from tests.models import MLP, ce_loss, make_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# small tensors: one thread (on a loaded 2-core machine, waiting at OpenMP barriers made these
# tests 10-40x slower with two)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bits(t):
    """A tensor's bytes as int64 (float64 compared bitwise, NaN payloads included)."""
    return t.view(torch.int64) if t.dtype == torch.float64 else t


def make_values(n=200, seed=0, *, full=True, groups=4):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 4, (n,), generator=g)
    values = torch.randn(n, dtype=torch.float64, generator=g) * 1e-3
    values[counts == 0] = 0.0
    if not full:
        return ik.Values(values, counts, 17)
    grp = torch.randint(-1, groups, (n,), generator=g)
    hist = torch.randn(6, groups, dtype=torch.float64, generator=g)
    val_loss = torch.linspace(2.0, 1.5, 17, dtype=torch.float64)
    val_loss[::3] = math.nan
    return ik.Values(values, counts, 17, groups=grp, group_names=[f"g{i}" for i in range(groups)],
                     history=hist, history_steps=torch.tensor([3, 6, 9, 12, 15, 17]),
                     val_loss=val_loss, meta={"estimator": "midpoint", "lr": 0.1, "nan": math.nan,
                                              "fingerprint": [1, 2, 3]})


# ---- save / load ----------------------------------------------------------------------------
@pytest.mark.parametrize("full", [False, True], ids=["values-counts", "history-groups-val_loss"])
def test_round_trip_is_bitwise(tmp_path, full):
    V = make_values(full=full)
    path = tmp_path / "v.safetensors"
    V.save(path)
    W = ik.Values.load(path)
    for name in ("values", "counts", "groups", "history", "history_steps", "val_loss"):
        a, b = getattr(V, name), getattr(W, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), name
    assert W.steps == V.steps and W.group_names == V.group_names
    assert json.dumps(W.meta, sort_keys=True) == json.dumps(V.meta, sort_keys=True)
    # a plain safetensors file (any reader), and the sidecar describes it
    from safetensors.torch import load_file
    assert torch.equal(bits(load_file(str(path))["values"]), bits(V.values))
    side = json.loads((tmp_path / "v.safetensors.json").read_text())
    assert side["format_version"] == results.FORMAT_VERSION and side["version"] == ik.__version__
    assert side["steps"] == 17 and side["num_samples"] == V.num_samples
    assert not [p for p in os.listdir(tmp_path) if ".inrun-tmp-" in p]


def test_save_is_crash_safe_and_a_stale_sidecar_is_noticed(tmp_path, monkeypatch):
    path = tmp_path / "v.st"
    old = make_values(seed=1)
    old.save(path)
    before = path.read_bytes()

    def dies(f, arrays, metadata):   # a failure half way through the write
        f.write(b"partial")
        raise RuntimeError("killed")
    monkeypatch.setattr(results, "_write_safetensors", dies)
    with pytest.raises(RuntimeError, match="killed"):
        make_values(seed=2).save(path)
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".inrun-tmp-" in p]
    monkeypatch.undo()
    side = json.loads((tmp_path / "v.st.json").read_text())
    side["save_id"] = "another save"
    (tmp_path / "v.st.json").write_text(json.dumps(side))
    with pytest.warns(UserWarning, match="does not describe"):
        W = ik.Values.load(path)
    assert torch.equal(bits(W.values), bits(old.values))


def test_meta_must_be_json(tmp_path):
    V = ik.Values(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long), 0,
                  meta={"x": object()})
    with pytest.raises(TypeError, match="JSON"):
        V.save(tmp_path / "v.st")


def test_load_engine_and_ledger_files(tmp_path):
    led = ValueLedger(5)
    led.add(torch.tensor([1, 3, 3]), torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64))
    led.save(tmp_path / "ledger.pt")
    atomic_save({"ledger": led.state_dict(), "steps": 4}, tmp_path / "engine.pt")
    a, b = ik.Values.load(tmp_path / "ledger.pt"), ik.Values.load(tmp_path / "engine.pt")
    assert a.steps is None and b.steps == 4
    for V in (a, b):
        assert torch.equal(V.values, led.values) and torch.equal(V.counts, led.counts)
    (tmp_path / "junk.st").write_bytes(b"not a values file")
    with pytest.raises(ValueError, match="neither"):
        ik.Values.load(tmp_path / "junk.st")


# ---- exports --------------------------------------------------------------------------------
def test_csv_without_pandas(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)     # as if pandas were not installed
    V = make_values(n=50)
    with pytest.raises(ImportError, match="to_csv"):
        V.to_pandas()
    V.to_csv(tmp_path / "v.csv", chunk_size=7)           # several chunks, one partial
    with open(tmp_path / "v.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "value", "count", "group"] and len(rows) == 51
    assert [int(r[0]) for r in rows[1:]] == list(range(50))
    assert torch.equal(torch.tensor([float(r[1]) for r in rows[1:]], dtype=torch.float64), V.values)
    assert [int(r[2]) for r in rows[1:]] == V.counts.tolist()
    assert [int(r[3]) for r in rows[1:]] == V.groups.tolist()
    make_values(n=5, full=False).to_csv(tmp_path / "w.csv")
    assert (tmp_path / "w.csv").read_text().splitlines()[0] == "id,value,count"


def test_to_pandas():
    pd = pytest.importorskip("pandas", reason="pandas is optional and not installed here; "
                                              "test_csv_without_pandas covers the export without it")
    V = make_values()
    df = V.to_pandas()
    assert list(df.columns) == ["id", "value", "count", "group"] and len(df) == V.num_samples
    assert torch.equal(torch.tensor(df["value"].to_numpy()), V.values)
    assert df["count"].tolist() == V.counts.tolist() and df["group"].tolist() == V.groups.tolist()
    assert isinstance(df, pd.DataFrame)


def test_to_parquet(tmp_path, monkeypatch):
    V = make_values()
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ImportError, match="pyarrow"):
            V.to_parquet(tmp_path / "v.parquet")
        pytest.skip("pyarrow is optional and not installed here: checked the error message only")
    V.to_parquet(tmp_path / "v.parquet", chunk_size=64)
    t = pq.read_table(tmp_path / "v.parquet")
    assert t.column_names == ["id", "value", "count", "group"]
    assert torch.equal(torch.tensor(t.column("value").to_pylist(), dtype=torch.float64), V.values)


# ---- statistics -----------------------------------------------------------------------------
def test_top_bottom_skip_unseen_ids(monkeypatch):
    monkeypatch.setattr(results, "CHUNK", 16)     # many chunks: the running top-k merge
    g = torch.Generator().manual_seed(3)
    n = 300
    counts = torch.randint(0, 2, (n,), generator=g)
    values = -torch.rand(n, dtype=torch.float64, generator=g) - 0.1   # every seen value < 0
    values[counts == 0] = 0.0                                          # unseen: 0, the largest
    V = ik.Values(values, counts, 5)
    seen = counts.nonzero().flatten()
    for k in (1, 7, 40):
        ids, vals = V.top(k)
        want = seen[torch.argsort(values[seen], descending=True)[:k]]
        assert ids.tolist() == want.tolist() and torch.equal(vals, values[want])
        ids, vals = V.bottom(k)
        want = seen[torch.argsort(values[seen])[:k]]
        assert ids.tolist() == want.tolist() and (vals < 0).all()
    ids, vals = V.top(n)                            # k > seen: only the seen ones
    assert ids.numel() == seen.numel() and set(ids.tolist()) == set(seen.tolist())
    assert V.top(0)[0].numel() == 0
    none = ik.Values(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 0)
    assert none.top(3)[0].numel() == 0 and none.bottom(3)[0].numel() == 0
    assert math.isnan(none.negative_fraction())
    assert V.negative_fraction() == 1.0


def test_by_group_sums_equal_the_values(monkeypatch):
    monkeypatch.setattr(results, "CHUNK", 97)
    V = make_values(n=500, groups=5)
    bg = V.by_group()
    assert bg.ids.tolist() == [0, 1, 2, 3, 4, -1] and bg.names[:2] == ["g0", "g1"]
    assert bg.names[-1] == "(no group)"
    for row, gid in enumerate(bg.ids.tolist()):
        m = V.groups == gid
        torch.testing.assert_close(bg.values[row], V.values[m].sum(), rtol=1e-12, atol=1e-15)
        assert int(bg.counts[row]) == int(V.counts[m].sum())
        assert int(bg.samples[row]) == int(m.sum()) and int(bg.seen[row]) == int((V.counts[m] > 0).sum())
        assert int(bg.negative[row]) == int(((V.values < 0) & m & (V.counts > 0)).sum())
    torch.testing.assert_close(bg.values.sum(), V.values.sum(), rtol=1e-12, atol=1e-15)
    other = torch.arange(V.num_samples) % 3                # groups passed in: no -1 row
    bo = V.by_group(other, names=["a", "b", "c"])
    assert bo.names == ["a", "b", "c"]
    torch.testing.assert_close(bo.values, torch.stack([V.values[other == i].sum() for i in range(3)]))
    with pytest.raises(ValueError, match="no groups"):
        make_values(full=False).by_group()


def test_history_sums_equal_the_values_of_the_steps():
    """A run by hand: per-step values of the batch's ids, recorded per group every 4 steps."""
    g = torch.Generator().manual_seed(5)
    n, G, steps, every = 60, 3, 22, 4
    groups = torch.arange(n) % G
    values = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    rows, ends, row = [], [], torch.zeros(G, dtype=torch.float64)
    per_step = []
    for t in range(steps):
        ids = torch.randint(0, n, (8,), generator=g)
        v = torch.randn(8, dtype=torch.float64, generator=g)
        values.index_add_(0, ids, v)
        counts.index_add_(0, ids, torch.ones_like(ids))
        row.index_add_(0, groups[ids], v)
        per_step.append(v.sum())
        if (t + 1) % every == 0 or t + 1 == steps:
            rows.append(row)
            ends.append(t + 1)
            row = torch.zeros(G, dtype=torch.float64)
    V = ik.Values(values, counts, steps, groups=groups, history=torch.stack(rows),
                  history_steps=torch.tensor(ends))
    torch.testing.assert_close(V.history.sum(0), V.by_group().values, rtol=1e-12, atol=1e-12)
    cum = torch.cumsum(torch.stack(per_step), 0)
    torch.testing.assert_close(V.history.sum(1).cumsum(0), cum[V.history_steps - 1])
    with pytest.raises(ValueError, match="group id 2"):
        ik.Values(values, counts, steps, groups=groups, history=torch.stack(rows)[:, :2],
                  history_steps=torch.tensor(ends))
    with pytest.raises(ValueError, match="go together"):
        ik.Values(values, counts, steps, history=torch.stack(rows))


def test_efficiency_and_summary():
    V = make_values()
    s, drop = V.efficiency()                  # val_loss[0] is NaN: the first finite is step 1
    assert s == float(V.values.sum())
    assert drop == pytest.approx(float(V.val_loss[1] - V.val_loss[16]))
    assert V.val_loss_span() == (1, 16)
    assert V.efficiency().ratio == pytest.approx(s / drop)
    assert math.isnan(make_values(full=False).efficiency().loss_drop)
    one = ik.Values(V.values, V.counts, 3, val_loss=torch.tensor([math.nan, 1.0, math.nan]))
    assert math.isnan(one.efficiency().loss_drop) and math.isnan(one.efficiency().ratio)
    summ = V.summary()
    seen = V.values[V.counts > 0]
    assert summ["seen"] == seen.numel() == V.num_seen
    assert summ["mean"] == pytest.approx(float(seen.mean()), rel=1e-12)
    assert summ["std"] == pytest.approx(float(seen.std()), rel=1e-9)
    assert summ["negative_fraction"] == V.negative_fraction() == float((seen < 0).double().mean())
    assert "num_samples=200" in repr(V) and "history=6x4" in repr(V)


def test_efficiency_of_a_real_run(tmp_path, monkeypatch):
    """SGD, midpoint: the values of a run add up to the validation loss drop (efficiency);
    eng.results() and a Values loaded from eng.save agree."""
    monkeypatch.setenv("INRUN_BACKEND", "torch")    # not the interpreted Triton kernels: results only
    torch.manual_seed(0)
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    val = make_data(8, (17,), 5, seed=1)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=40, estimator="midpoint",
                          verify=False, groups=torch.arange(40) % 3, group_names=["a", "b", "c"],
                          history_every=5)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(12):
        with torch.no_grad():
            losses.append(float(ce_loss(model, val).mean()))
        ids = torch.randint(0, 40, (6,), generator=g)
        opt.zero_grad()
        eng.step(make_data(6, (17,), 5, seed=int(ids.sum())), ids)
        opt.step()
    V = eng.results()
    assert V.values.data_ptr() != eng.values.data_ptr() and torch.equal(V.values, eng.values)
    assert V.steps == 12 and V.history_steps.tolist() == [5, 10, 12] and V.meta["estimator"] == "midpoint"
    torch.testing.assert_close(V.history.sum(0), V.by_group().values[:3], rtol=1e-12, atol=1e-15)
    eng.save(tmp_path / "eng.pt")
    W = ik.Values.load(tmp_path / "eng.pt")
    for name in ("values", "counts", "history", "history_steps", "val_loss"):
        assert torch.equal(bits(getattr(W, name)), bits(getattr(V, name))), name
    assert W.steps == 12
    # the midpoint's validation pass is at shifted weights: val_loss is NaN; measured here instead
    V = ik.Values(V.values, V.counts, V.steps, val_loss=torch.tensor(losses, dtype=torch.float64))
    # the drop val_loss[0] - val_loss[11] covers steps 0..10; leave out step 11's values
    s = float(V.values.sum() - eng.last_values.sum())
    assert s == pytest.approx(V.efficiency().loss_drop, rel=2e-3)
    eng.close()


def test_from_engine_reads_optional_attributes():
    eng = types.SimpleNamespace(
        values=torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64), counts=torch.tensor([1, 2, 0]),
        steps=2, groups=torch.tensor([0, 1, -1]), group_names=("a", "b"),
        history=[torch.tensor([1.0, 0.0], dtype=torch.float64),
                 torch.tensor([0.0, -2.0], dtype=torch.float64)],
        history_steps=[1, 2], val_loss=torch.tensor([1.0, 0.9]), meta={"estimator": "first"})
    V = ik.Values.from_engine(eng)
    assert V.history.shape == (2, 2) and V.history.dtype == torch.float64
    assert V.group_names == ["a", "b"] and V.val_loss.dtype == torch.float64
    assert V.meta == {"estimator": "first"} and V.meta is not eng.meta
    bare = ik.Values.from_engine(types.SimpleNamespace(values=eng.values, counts=eng.counts, steps=2),
                                 copy_arrays=False)
    assert bare.values.data_ptr() == eng.values.data_ptr() and bare.history is None and bare.groups is None


# ---- report ---------------------------------------------------------------------------------
def test_report_renders_from_a_saved_file(tmp_path):
    V = make_values(n=300)
    V.save(tmp_path / "v.st")
    (tmp_path / "texts.jsonl").write_text(
        "".join(json.dumps({"text": f"sample {i} | <tag>"}) + "\n" for i in range(300)))
    (tmp_path / "groups.txt").write_text("".join(f"{i % 3}\n" for i in range(300)))
    (tmp_path / "names.txt").write_text("alpha\nbeta\ngamma\n")
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "inrun_kernels", "report", str(tmp_path / "v.st"),
                        "--top", "4", "--out", str(out), "--texts", str(tmp_path / "texts.jsonl")],
                       capture_output=True, text=True, cwd=REPO, timeout=120, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    for section in ("## Summary", "## Distribution of values", "## Value by group",
                    "## Top 4: most helpful", "## Bottom 4: most harmful", "## Efficiency check"):
        assert section in md, section
    assert "![histogram of values](values_hist.png)" in md and "(groups.png)" in md
    assert "sample " in md and "\\|" in md and "<tag>" not in md      # texts, escaped
    top_id = int(V.top(1)[0])
    assert f"| 1 | {top_id} |" in md and "Reference:" in md and "ratio" in md
    for png in ("values_hist.png", "groups.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # --groups / --names override; the engine's torch file is accepted (no val_loss, no history)
    led = ValueLedger(300)
    led.load_state_dict({"values": V.values, "counts": V.counts, "num_samples": 300})
    atomic_save({"ledger": led.state_dict(), "steps": 17}, tmp_path / "eng.pt")
    from inrun_kernels.report import main
    assert main([str(tmp_path / "eng.pt"), "--groups", str(tmp_path / "groups.txt"),
                 "--names", str(tmp_path / "names.txt"), "--out", str(out / "2")]) == 0
    md = (out / "2" / "report.md").read_text()
    assert "| 0 | alpha |" in md and "Not available" in md and (out / "2" / "groups.png").stat().st_size
    assert main([str(tmp_path / "missing.st")]) == 2


def test_report_command_routing():
    assert _values_report(["v.st"]) and _values_report(["--top", "3", "v.st"])
    assert _values_report(["-h"])
    assert not _values_report([]) and not _values_report(["--json", "a.json", "--out", "R.md"])
    assert not _values_report(["--no-estimators"])


# ---- scale ----------------------------------------------------------------------------------
SCALE = textwrap.dedent("""
    import gc, re, sys, torch
    import inrun_kernels as ik
    def rss(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
    def extra(fn):                      # MiB above the resident size before fn, at fn's peak
        gc.collect(); base = rss("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        fn()
        return rss("VmHWM") - base
    n, path = int(sys.argv[1]), sys.argv[2]
    ar = torch.arange(n)
    counts = ar % 3                                          # a third never seen
    values = torch.sin(ar.to(torch.float64)) * (counts > 0)  # cheap to make, either sign
    groups = ar % 9 - 1
    del ar
    V = ik.Values(values, counts, 10, groups=groups)
    out = {"array_mib": n * 8 / 2**20}
    out["stats"] = extra(lambda: (V.top(100), V.bottom(100), V.by_group(), V.negative_fraction(),
                                  V.summary(), V.efficiency()))
    out["save"] = extra(lambda: V.save(path))
    del V, values, counts, groups
    box = []
    out["load"] = extra(lambda: box.append(ik.Values.load(path)))
    V = box[0]
    small = ik.Values(V.values[:n // 20], V.counts[:n // 20], 10, groups=V.groups[:n // 20])
    out["csv"] = extra(lambda: small.to_csv(path + ".csv"))
    print(out)
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="needs Linux /proc to measure peak memory")
def test_memory_at_ten_million_ids(tmp_path):
    """10^7 ids (76 MiB per array): statistics and save need O(chunk) beyond the arrays, load
    only its own arrays (3 x 76 MiB), the CSV of 5 x 10^5 rows (8 chunks) O(chunk)."""
    r = subprocess.run([sys.executable, "-c", SCALE, str(10**7), str(tmp_path / "big.st")],
                       capture_output=True, text=True, cwd=REPO, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    out = eval(r.stdout.strip().splitlines()[-1])
    arr = out["array_mib"]
    assert out["stats"] < 0.6 * arr, out          # a full-size temporary would be >= 1 array
    assert out["save"] < 0.6 * arr, out
    assert out["load"] < 3 * arr + 0.6 * arr, out  # values, counts, groups: once
    assert out["csv"] < 0.6 * arr, out
