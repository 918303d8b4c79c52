"""The results of a run: `Values` (per-sample values, counts, per-group history, validation loss)
with summaries, exports (CSV, pandas, Parquet) and a crash-safe save/load.

File format of `Values.save(path)` (format version 1):
  - `path`: a safetensors file with the arrays (values F64 [N], counts I64 [N]; where present
    groups I64 [N], history F64 [R, G], history_steps I64 [R], val_loss F64 [S]). Its header
    metadata key "inrun_kernels" holds the JSON below, so this one file is complete.
  - `path + ".json"`: the same JSON, indented, for people and tools: format, format_version,
    version (of inrun_kernels), save_id, steps, num_samples, arrays, group_names, meta.
Both are written crash-safely (ledger.atomic_write: temp file beside the target, fsync, rename),
the arrays file first. `Values.load` reads the arrays file only; a sidecar whose save_id differs
(a save killed between its two renames) gets a warning and is rewritten by the next save.

Large datasets: every method works on the arrays in chunks of CHUNK ids with vectorised torch
ops (no Python object per id is kept; CSV rows are formatted one chunk at a time), so beyond the
arrays themselves a call needs O(CHUNK + k) memory.
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import sys
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .ledger import atomic_write

FORMAT = "inrun_kernels.values"
FORMAT_VERSION = 1
META_KEY = "inrun_kernels"      # safetensors header metadata key holding the JSON description
CHUNK = 1 << 18                 # ids per chunk of every pass over the arrays (2 MiB of float64)
REPR_STATS_MAX = 10**7          # repr() summarises the values up to this many ids
_ST_DTYPES = {torch.float64: "F64", torch.int64: "I64"}


def _chunks(n: int, size: int | None = None):
    size = size or CHUNK
    for s in range(0, n, size):
        yield s, min(n, s + size)


def _package_version() -> str:
    from . import __version__
    return __version__


def _tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, (list, tuple)) and x and all(isinstance(r, Tensor) for r in x):
        return torch.stack([r.detach().cpu() for r in x])
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"Values: {name} must be a tensor (or array-like), got {type(x).__name__}") from e


def _array(x, name: str, dtype: torch.dtype, dim: int, rows: int | None = None) -> Tensor:
    """x as a contiguous CPU tensor of `dtype` with `dim` dims (rows of them if given); no copy
    when it already is one."""
    t = _tensor(x, name)
    if dtype == torch.int64 and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"Values: {name} must hold integers, got dtype {t.dtype}")
    if dtype == torch.float64 and (t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"Values: {name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"Values: {name} must have {dim} dimension(s), got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"Values: {name} has {t.shape[0]} rows, expected {rows}")
    return t.to(dtype).contiguous()


class Efficiency(NamedTuple):
    """Sum of all values vs how much the validation loss dropped over the run."""
    value_sum: float    # sum of every sample's value
    loss_drop: float    # val_loss[first finite] - val_loss[last finite]; NaN if not recorded

    @property
    def ratio(self) -> float:
        """value_sum / loss_drop (1: the values account for the whole drop); NaN if undefined."""
        if not math.isfinite(self.loss_drop) or self.loss_drop == 0:
            return math.nan
        return self.value_sum / self.loss_drop


@dataclass
class GroupTotals:
    """Per-group sums, one row per group (ids ascending; -1, last, gathers the samples without
    a group and is there only if some sample has none)."""
    ids: Tensor        # int64 [G]   group id
    names: list        # [G]         group name
    values: Tensor     # float64 [G] sum of the values of the group's samples
    counts: Tensor     # int64 [G]   sum of their counts (appearances in steps)
    samples: Tensor    # int64 [G]   samples in the group
    seen: Tensor       # int64 [G]   samples with count > 0
    negative: Tensor   # int64 [G]   seen samples with value < 0

    def mean_seen(self) -> Tensor:
        """float64 [G]: the mean value of a seen sample of each group (NaN: none seen)."""
        return self.values / self.seen.to(torch.float64)

    def __len__(self) -> int:
        return int(self.ids.numel())


class Values:
    """Per-sample In-Run Data Shapley values of a run and what was recorded with them.

    values  float64 [N]  each sample's values summed over the steps (> 0: lowered the
                         validation loss, helpful)
    counts  int64 [N]    in how many steps each sample appeared (0: never seen)
    steps   int          committed steps (None: not recorded, e.g. a ValueLedger file)
    history float64 [R, G] (optional) each group's summed value over the steps of record r
    history_steps int64 [R]  the engine's step count at the end of each record
    groups  int64 [N] (optional) group id per sample, -1 = none; group_names: list[str] or None
    val_loss float64 [S] (optional) mean validation loss at the start of each step, NaN where
                         not recorded
    meta    dict (JSON-able): package version, fingerprints, estimator, update, ...

    The constructor keeps the given tensors when they already are contiguous CPU tensors of the
    right dtype (no copy); `from_engine` copies by default."""

    def __init__(self, values, counts, steps: int | None, *, history=None, history_steps=None,
                 groups=None, group_names=None, val_loss=None, meta: dict | None = None):
        self.values = _array(values, "values", torch.float64, 1)
        n = self.values.shape[0]
        self.counts = _array(counts, "counts", torch.int64, 1, n)
        if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 0):
            raise ValueError(f"Values: steps must be an int >= 0 (or None), got {steps!r}")
        self.steps = None if steps is None else int(steps)
        self.groups = None if groups is None else _array(groups, "groups", torch.int64, 1, n)
        self.group_names = None if group_names is None else [str(s) for s in group_names]
        if (history is None) != (history_steps is None):
            raise ValueError("Values: history and history_steps go together (one row of history "
                             "per recorded engine step count)")
        self.history = self.history_steps = None
        if history is not None:
            self.history = _array(history, "history", torch.float64, 2)
            self.history_steps = _array(history_steps, "history_steps", torch.int64, 1,
                                        self.history.shape[0])
            if self.history_steps.numel() > 1 and bool((self.history_steps.diff() < 0).any()):
                raise ValueError("Values: history_steps must be non-decreasing")
        self.val_loss = None if val_loss is None else _array(val_loss, "val_loss", torch.float64, 1)
        self.meta = {} if meta is None else dict(meta)
        self._check_groups()

    def _check_groups(self) -> None:
        g_hist = None if self.history is None else self.history.shape[1]
        if self.group_names is not None and g_hist is not None and len(self.group_names) != g_hist:
            raise ValueError(f"Values: {len(self.group_names)} group_names but history has {g_hist} "
                             "group columns")
        if self.groups is not None and self.groups.numel():
            lo, hi = int(self.groups.min()), int(self.groups.max())
            if lo < -1:
                raise ValueError(f"Values: group ids must be >= -1 (-1 = no group), got {lo}")
            limit = g_hist if g_hist is not None else (
                len(self.group_names) if self.group_names is not None else None)
            if limit is not None and hi >= limit:
                raise ValueError(f"Values: group id {hi} but only {limit} groups "
                                 f"({'history columns' if g_hist is not None else 'group_names'})")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_engine(cls, eng, *, copy_arrays: bool = True) -> "Values":
        """A snapshot of an engine (InRunShapley): values, counts, steps and, where the engine
        has them, groups, group_names, history, history_steps, val_loss and meta. With
        copy_arrays=False the arrays are shared with the engine (no extra memory; they then
        change as it trains)."""
        def take(x):
            if x is None:
                return None
            if isinstance(x, (list, tuple)) and not x:
                return None
            t = _tensor(x, "engine attribute")
            return t.clone() if copy_arrays and isinstance(x, Tensor) else t

        history = take(getattr(eng, "history", None))
        history_steps = take(getattr(eng, "history_steps", None)) if history is not None else None
        names = getattr(eng, "group_names", None)
        meta = getattr(eng, "meta", None)
        return cls(take(eng.values), take(eng.counts), int(eng.steps), history=history,
                   history_steps=history_steps, groups=take(getattr(eng, "groups", None)),
                   group_names=None if names is None else list(names),
                   val_loss=take(getattr(eng, "val_loss", None)),
                   meta=copy.deepcopy(dict(meta)) if meta else None)

    # ---- sizes and summaries -----------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.values.shape[0])

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_groups(self) -> int:
        """Group columns of history, else len(group_names), else max(groups) + 1, else 0."""
        if self.history is not None:
            return int(self.history.shape[1])
        if self.group_names is not None:
            return len(self.group_names)
        if self.groups is not None and self.groups.numel():
            return int(self.groups.max()) + 1
        return 0

    def summary(self) -> dict:
        """One pass over the arrays: num_samples, seen (count > 0), appearances (sum of counts),
        value_sum (all ids), and over the seen ids: mean, std, min, max, negative (count) and
        negative_fraction. NaN where no id was seen."""
        seen = neg = appearances = 0
        mean = m2 = 0.0                  # running mean and squared deviations (Chan et al.)
        lo, hi = math.inf, -math.inf
        total = 0.0
        for s, e in _chunks(self.num_samples):
            v, c = self.values[s:e], self.counts[s:e]
            total += float(v.sum())
            appearances += int(c.sum())
            vs = v[c > 0]
            nb = vs.numel()
            if nb:
                mb = float(vs.mean())
                m2b = float(((vs - mb) ** 2).sum())
                d, nt = mb - mean, seen + nb
                mean += d * nb / nt
                m2 += m2b + d * d * seen * nb / nt
                seen = nt
                neg += int((vs < 0).sum())
                lo, hi = min(lo, float(vs.min())), max(hi, float(vs.max()))
        std = math.sqrt(m2 / (seen - 1)) if seen > 1 else math.nan
        return {"num_samples": self.num_samples, "seen": seen, "appearances": appearances,
                "value_sum": total, "mean": mean if seen else math.nan, "std": std,
                "min": lo if seen else math.nan, "max": hi if seen else math.nan, "negative": neg,
                "negative_fraction": neg / seen if seen else math.nan}

    @property
    def num_seen(self) -> int:
        """Ids with count > 0."""
        return sum(int((self.counts[s:e] > 0).sum()) for s, e in _chunks(self.num_samples))

    def negative_fraction(self) -> float:
        """Fraction of the seen ids (count > 0) whose value is < 0 (NaN if none was seen)."""
        seen = neg = 0
        for s, e in _chunks(self.num_samples):
            m = self.counts[s:e] > 0
            seen += int(m.sum())
            neg += int((m & (self.values[s:e] < 0)).sum())
        return neg / seen if seen else math.nan

    # ---- rankings ----------------------------------------------------------------------------
    def _extreme(self, k: int, largest: bool) -> tuple[Tensor, Tensor]:
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        k = int(k)
        fill = -math.inf if largest else math.inf
        best_v = torch.empty(0, dtype=torch.float64)
        best_i = torch.empty(0, dtype=torch.int64)
        if k:
            for s, e in _chunks(self.num_samples):
                v = self.values[s:e].masked_fill(self.counts[s:e] == 0, fill)
                v, i = torch.topk(v, min(k, e - s), largest=largest, sorted=False)
                v, i = torch.cat([best_v, v]), torch.cat([best_i, i + s])
                if v.numel() > k:   # keep the running best k: memory O(CHUNK + k)
                    v, j = torch.topk(v, k, largest=largest, sorted=False)
                    i = i[j]
                best_v, best_i = v, i
        keep = best_v != fill    # the filler of unseen ids (values are finite)
        best_v, best_i = best_v[keep], best_i[keep]
        order = torch.argsort(best_i)                                   # ties: lower id first
        best_v, best_i = best_v[order], best_i[order]
        order = torch.sort(best_v, descending=largest, stable=True).indices
        return best_i[order], best_v[order]

    def top(self, k: int) -> tuple[Tensor, Tensor]:
        """(ids, values) of the k seen ids (count > 0) with the largest values, largest first;
        fewer when fewer were seen. Never-seen ids are never returned."""
        return self._extreme(k, largest=True)

    def bottom(self, k: int) -> tuple[Tensor, Tensor]:
        """(ids, values) of the k seen ids with the smallest values, smallest first."""
        return self._extreme(k, largest=False)

    # ---- groups ------------------------------------------------------------------------------
    def by_group(self, groups=None, names=None) -> GroupTotals:
        """Sums of values and counts per group. groups: int64 [N] group id per sample (-1 = none;
        default: the stored groups); names: list of group names (default: the stored ones when
        the stored groups are used, else "group <id>")."""
        if groups is None:
            if self.groups is None:
                raise ValueError("by_group: these Values have no groups; pass groups= (one id per sample)")
            groups = self.groups
            if names is None:
                names = self.group_names
        else:
            groups = _array(groups, "groups", torch.int64, 1, self.num_samples)
        n = self.num_samples
        if n and int(groups.min()) < -1:
            raise ValueError(f"by_group: group ids must be >= -1 (-1 = no group), got {int(groups.min())}")
        g = max(int(groups.max()) + 1 if n else 0, len(names) if names is not None else 0,
                self.num_groups if groups is self.groups else 0)
        vals = torch.zeros(g + 1, dtype=torch.float64)   # slot 0: group -1
        cnts = torch.zeros(g + 1, dtype=torch.int64)
        samples = torch.zeros(g + 1, dtype=torch.int64)
        seen = torch.zeros(g + 1, dtype=torch.int64)
        neg = torch.zeros(g + 1, dtype=torch.int64)
        for s, e in _chunks(n):
            idx = groups[s:e] + 1
            v, c = self.values[s:e], self.counts[s:e]
            vals.index_add_(0, idx, v)
            cnts.index_add_(0, idx, c)
            samples += torch.bincount(idx, minlength=g + 1)
            m = c > 0
            seen += torch.bincount(idx[m], minlength=g + 1)
            neg += torch.bincount(idx[m & (v < 0)], minlength=g + 1)
        order = list(range(1, g + 1)) + ([0] if int(samples[0]) else [])
        ids = torch.tensor(order, dtype=torch.int64) - 1
        labels = [("(no group)" if i < 0 else
                   names[i] if names is not None and i < len(names) else f"group {i}")
                  for i in ids.tolist()]
        o = torch.tensor(order, dtype=torch.int64)
        return GroupTotals(ids, labels, vals[o], cnts[o], samples[o], seen[o], neg[o])

    def group_label(self, gid: int) -> str:
        """The name of group gid ("group <id>" when unnamed, "" for -1)."""
        if gid < 0:
            return ""
        if self.group_names is not None and gid < len(self.group_names):
            return self.group_names[gid]
        return f"group {gid}"

    # ---- efficiency --------------------------------------------------------------------------
    def val_loss_span(self) -> tuple[int, int] | None:
        """(first, last): the steps of the first and last finite val_loss; None if fewer than
        two are recorded."""
        if self.val_loss is None:
            return None
        fin = torch.isfinite(self.val_loss).nonzero().flatten()
        if fin.numel() < 2:
            return None
        return int(fin[0]), int(fin[-1])

    def efficiency(self) -> Efficiency:
        """(value_sum, loss_drop): the sum of all values, and val_loss[first finite] -
        val_loss[last finite] (NaN when fewer than two are recorded). Shapley values sum to each
        step's utility, L_val before minus after it, so over the run they should add up to the
        drop of the validation loss (see README, "What is computed", for when they do not)."""
        span = self.val_loss_span()
        drop = math.nan if span is None else float(self.val_loss[span[0]] - self.val_loss[span[1]])
        return Efficiency(float(self.values.sum()), drop)

    # ---- exports -----------------------------------------------------------------------------
    def to_pandas(self):
        """A pandas DataFrame with columns id, value, count[, group] (one row per id)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Values.to_pandas() needs pandas (pip install pandas); "
                              "Values.to_csv(path) writes the same columns without it") from e
        cols = {"id": torch.arange(self.num_samples).numpy(), "value": self.values.numpy(),
                "count": self.counts.numpy()}
        if self.groups is not None:
            cols["group"] = self.groups.numpy()
        return pd.DataFrame(cols)

    def to_csv(self, path: str | os.PathLike, *, chunk_size: int = 1 << 16) -> None:
        """Write id,value,count[,group] rows (header first; values as Python's shortest
        round-trip repr) chunk by chunk, crash-safely. Needs no pandas."""
        has_g = self.groups is not None
        fmt = ("{},{!r},{},{}" if has_g else "{},{!r},{}").format

        def write(f):
            f.write(b"id,value,count,group\n" if has_g else b"id,value,count\n")
            for s, e in _chunks(self.num_samples, chunk_size):
                cols = [range(s, e), self.values[s:e].tolist(), self.counts[s:e].tolist()]
                if has_g:
                    cols.append(self.groups[s:e].tolist())
                f.write(("\n".join(map(fmt, *cols)) + "\n").encode())
        atomic_write(path, write)

    def to_parquet(self, path: str | os.PathLike, *, chunk_size: int = CHUNK) -> None:
        """Write id,value,count[,group] to a Parquet file (one row group per chunk; needs
        pyarrow, not pandas), crash-safely."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("Values.to_parquet() needs pyarrow (pip install pyarrow); "
                              "Values.to_csv(path) works without it") from e
        fields = [("id", pa.int64()), ("value", pa.float64()), ("count", pa.int64())]
        if self.groups is not None:
            fields.append(("group", pa.int64()))
        schema = pa.schema(fields)

        def write(f):
            with pq.ParquetWriter(f, schema) as w:
                for s, e in _chunks(self.num_samples, chunk_size):
                    cols = [torch.arange(s, e).numpy(), self.values[s:e].numpy(),
                            self.counts[s:e].numpy()]
                    if self.groups is not None:
                        cols.append(self.groups[s:e].numpy())
                    w.write_table(pa.Table.from_arrays([pa.array(c) for c in cols], schema=schema))
        atomic_write(path, write)

    # ---- save / load -------------------------------------------------------------------------
    def _arrays(self) -> dict[str, Tensor]:
        arrays = {"values": self.values, "counts": self.counts}
        for name in ("groups", "history", "history_steps", "val_loss"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        return arrays

    def save(self, path: str | os.PathLike) -> None:
        """Crash-safe save: arrays to `path` (safetensors), the description (steps, meta,
        group_names, versions) in its header and in the sidecar `path + ".json"` (see the module
        docstring). Loading gives bitwise the same arrays."""
        path = os.fspath(path)
        arrays = self._arrays()
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": _package_version(),
                "save_id": uuid.uuid4().hex, "steps": self.steps, "num_samples": self.num_samples,
                "arrays": sorted(arrays), "group_names": self.group_names, "meta": self.meta}
        try:
            text = json.dumps(info, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Values.save: meta must be JSON-able ({e})") from e
        atomic_write(path, lambda f: _write_safetensors(f, arrays, {META_KEY: text}))
        atomic_write(path + ".json",
                     lambda f: f.write((json.dumps(info, sort_keys=True, indent=1) + "\n").encode()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Values":
        """Read what save() wrote; also an InRunShapley.save file (a torch file with a "ledger"
        state) or a ValueLedger.save file (steps then None)."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            return cls._load_safetensors(path)
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise ValueError(f"{path}: neither a Values.save file (safetensors) nor a torch file "
                             f"of InRunShapley.save / ValueLedger.save ({e})") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path}: a torch file holding {type(state).__name__}, not a state dict")
        if "ledger" in state:        # InRunShapley.state_dict()
            led, steps = state["ledger"], state.get("steps")
        elif "values" in state and "counts" in state:   # ValueLedger.state_dict()
            led, steps = state, state.get("steps")
        else:
            raise ValueError(f"{path}: a torch state dict without 'ledger' or 'values'/'counts' "
                             f"(keys: {sorted(map(str, state))[:10]})")
        extra = {k: state.get(k) for k in ("groups", "group_names", "meta")}
        extra.update(_recorded(state.get("recorder")))
        return cls(led["values"], led["counts"], None if steps is None else int(steps), **extra)

    @classmethod
    def _load_safetensors(cls, path: str) -> "Values":
        try:
            from safetensors import safe_open
        except ImportError as e:
            raise ImportError("Values.load needs safetensors for this file (pip install safetensors)") from e
        try:
            opened = safe_open(path, framework="pt", backend="pread")   # no mmap: one copy in RAM
        except TypeError:            # safetensors < 0.8 has no backend=
            opened = safe_open(path, framework="pt")
        with opened as f:
            md = f.metadata() or {}
            if META_KEY not in md:
                raise ValueError(f"{path}: a safetensors file, but not one Values.save wrote "
                                 f"(no {META_KEY!r} in its metadata)")
            info = json.loads(md[META_KEY])
            if info.get("format") != FORMAT or int(info.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"{path}: format {info.get('format')!r} version "
                                 f"{info.get('format_version')}; this inrun_kernels "
                                 f"{_package_version()} reads {FORMAT!r} up to version {FORMAT_VERSION}")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        side = path + ".json"
        try:
            with open(side, encoding="utf-8") as f:
                side_id = json.load(f).get("save_id")
        except (OSError, ValueError):
            side_id = info["save_id"]
        if side_id != info["save_id"]:
            warnings.warn(f"{side} does not describe {path} (a save stopped between the two files?); "
                          f"read the description kept in {path} itself", stacklevel=2)
        return cls(arrays["values"], arrays["counts"], info.get("steps"),
                   history=arrays.get("history"), history_steps=arrays.get("history_steps"),
                   groups=arrays.get("groups"), group_names=info.get("group_names"),
                   val_loss=arrays.get("val_loss"), meta=info.get("meta"))

    # ---- report ------------------------------------------------------------------------------
    def report(self, out_dir: str | os.PathLike, *, top: int = 10, texts=None) -> str:
        """Write out_dir/report.md and its PNGs (see inrun_kernels.report); returns the path."""
        from .report import write_report
        return write_report(self, out_dir, top=top, texts=texts)

    def __repr__(self) -> str:
        """Sizes; and, up to REPR_STATS_MAX ids (one pass over the arrays), seen, value_sum,
        mean_seen and the negative fraction (beyond: call summary())."""
        parts = [f"num_samples={self.num_samples}",
                 f"steps={self.steps if self.steps is not None else '?'}"]
        if self.num_samples <= REPR_STATS_MAX:
            s = self.summary()
            parts += [f"seen={s['seen']}", f"value_sum={s['value_sum']:.6g}",
                      f"mean_seen={s['mean']:.4g}",
                      f"negative={s['negative_fraction']:.1%}" if s["seen"] else "negative=n/a"]
        if self.groups is not None or self.history is not None:
            parts.append(f"groups={self.num_groups}")
        if self.history is not None:
            parts.append(f"history={self.history.shape[0]}x{self.history.shape[1]}")
        if self.val_loss is not None:
            parts.append(f"val_loss={self.val_loss.shape[0]}")
        return f"Values({', '.join(parts)})"


def _recorded(rec) -> dict:
    """history, history_steps and val_loss from an engine state's "recorder" (history.py's
    StepRecorder.state_dict: full rows, the open accumulator, per-step validation losses)."""
    if not isinstance(rec, dict):
        return {}
    out = {"val_loss": rec.get("val_loss")}
    rows, ends, acc = rec.get("rows"), rec.get("row_steps"), rec.get("acc")
    is_open = int(rec.get("open", 0)) > 0
    if isinstance(rows, Tensor) and (rows.shape[0] or is_open):   # no rows, none open: history off
        if is_open:
            rows = torch.cat([rows, acc.reshape(1, -1).to(rows.dtype)])
            ends = torch.cat([ends.long(), torch.tensor([int(rec["step"])])])
        out["history"], out["history_steps"] = rows, ends
    return out


def _write_safetensors(f, arrays: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format, streamed: 8-byte little-endian header size, JSON header (dtype,
    shape, byte offsets, __metadata__), then the raw little-endian data of each array in order.
    Written from the tensors' own memory (no copy of the arrays)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for name, t in arrays.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for t in arrays.values():
        if t.numel():
            a = t.contiguous().numpy()
            f.write(memoryview(a if sys.byteorder == "little" else a.byteswap()).cast("B"))
