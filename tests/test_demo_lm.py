"""The LM curation demo (issue 11, item 4) in its --quick form: corpus from the standard
library's documentation, corruption by kind, values that flag the corrupted documents above
chance by a margin, the three-way curation comparison, the plot and the saved values."""
import os
import random

import pytest
import torch

from inrun_kernels import demo_lm


def test_corpus_and_corruption_are_as_documented():
    docs = demo_lm.corpus()
    assert len(docs) >= 500 and all(d.isascii() and len(d) >= 48 for d in docs)
    rng = random.Random(0)
    out, kinds = demo_lm.corrupt(docs[:200], 0.2, rng)
    assert sum(k is not None for k in kinds) == 40
    assert {k for k in kinds if k} == set(demo_lm.KINDS)
    for d, k, orig in zip(out, kinds, docs[:200]):
        if k is None:
            assert d == orig
        elif k == "whitespace":
            assert d.strip() == ""
        elif k == "symbols":
            assert not any(c.isalpha() for c in d)
        elif k == "shuffled":
            assert sorted(d.split()) == sorted(orig.split())
        else:
            assert d in out and out.count(d) >= 2
    batch = demo_lm.encode(["ab", ""], 4)
    assert batch["input_ids"].tolist() == [[97, 98, 256, 256], [256] * 4]
    assert batch["labels"].tolist() == [[97, 98, -100, -100], [-100] * 4]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    return demo_lm.run(quick=True, seed=0, out=str(out), quiet=True), out


def test_quick_demo_flags_corrupted_documents_and_runs_the_curation(quick):
    r, out = quick
    a = r["auroc"]["In-Run value (low = suspect)"]
    # measured with this seed: all 0.82, whitespace 0.94, symbols 0.97; a margin, not the number
    assert a["all"] > 0.7 and a["whitespace"] > 0.8 and a["symbols"] > 0.8, a
    assert set(r["auroc"]) == {"In-Run value (low = suspect)", "final loss", "summed loss", "gradient norm"}
    assert 0 < r["negative_fraction"] < 0.5
    assert set(r["reach"]) == set(r["curves"]) and len(r["curves"]) == 3
    assert r["reach"]["(a) all documents"] == r["steps"]   # the target is where (a) ends
    assert os.path.getsize(out / "curation.png") > 10_000
    from inrun_kernels.results import Values
    v = Values.load(str(out / "values"))
    assert v.steps == r["engine_steps"] and v.values.shape == (r["n_train"],)
    assert abs(float(v.values.sum()) - r["values_sum"]) < 1e-9
