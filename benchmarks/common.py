"""Shared pieces of the benchmarks: configs, the GPT-2-style model, data, the per-sample
causal-LM loss, environment/hardware description and order statistics."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class StepConfig:
    """One step-level benchmark configuration (GPT-2-style causal LM)."""
    n_layer: int = 4
    d: int = 256          # n_embd
    T: int = 128          # sequence length of train and val samples
    N: int = 16           # training batch
    M: int = 1            # validation batch
    vocab: int = 8192
    n_head: int = 4
    dtype: str = "float32"   # parameter dtype
    autocast: str = "none"   # none | bf16 (GPU only)
    device: str = "cpu"

    @property
    def name(self) -> str:
        s = f"L{self.n_layer}-d{self.d}-T{self.T}-N{self.N}-M{self.M}-V{self.vocab}"
        if self.autocast != "none":
            s += f"-{self.autocast}"
        if self.device != "cpu":
            s += f"-{self.device}"
        return s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def cpu_configs(ds=(256, 512), Ts=(128, 256), Ns=(8, 16), Ms=(1, 4)) -> list[StepConfig]:
    """The issue's CPU grid: n_layer 4, d in {256, 512}, T in {128, 256}, N in {8, 16},
    M in {1, 4}, vocab 8192, n_head 4; ordered small to large."""
    cfgs = [StepConfig(d=d, T=T, N=N, M=M) for d in ds for T in Ts for N in Ns for M in Ms]
    return sorted(cfgs, key=lambda c: (c.d, c.T, c.N, c.M))


QUICK_CONFIG = StepConfig(d=256, T=128, N=8, M=1)          # smallest of the grid (CI)
TARGET_CONFIGS = (StepConfig(d=256, T=128, N=16, M=1), StepConfig(d=256, T=128, N=16, M=4))


def gpt2_small(T=1024, N=16, M=1, autocast="bf16", device="cuda") -> StepConfig:
    return StepConfig(n_layer=12, d=768, T=T, N=N, M=M, vocab=50257, n_head=12,
                      autocast=autocast, device=device)


# ---- model and data -----------------------------------------------------------------------
def make_model(cfg: StepConfig, seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel from a GPT2Config (no download), dropout 0, tied wte/lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel
    with contextlib.redirect_stderr(open(os.devnull, "w")):   # bos/eos id warnings for small vocabs
        conf = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.d, n_head=cfg.n_head, vocab_size=cfg.vocab,
                          n_positions=max(cfg.T, 128), resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=None)
        torch.manual_seed(seed)
        try:
            model = GPT2LMHeadModel(conf, attn_implementation="eager")
        except TypeError:
            conf._attn_implementation = "eager"
            model = GPT2LMHeadModel(conf)
    model.config.use_cache = False
    return model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)).train()


def make_batch(cfg: StepConfig, rows: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab, (rows, cfg.T), generator=g)
    labels = ids.clone()
    if cfg.T > 8:
        labels[:, -3:] = -100   # a few ignored tokens, as in padded data
    return {"input_ids": ids.to(cfg.device), "labels": labels.to(cfg.device)}


def make_data(cfg: StepConfig, seed: int = 1):
    return make_batch(cfg, cfg.N, seed), make_batch(cfg, cfg.M, seed + 1000)


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample causal-LM loss [B]: token-mean cross-entropy over the non -100 labels of each
    sample, logits shifted by one. Written here so that every method runs the same loss.
    position_ids are passed expanded to [B, T]: HF GPT-2 otherwise feeds wpe a broadcast [1, T]
    and its output gradient is already summed over the batch (no per-sample gradient for wpe)."""
    ids = batch["input_ids"]
    pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    logits = model(input_ids=ids, position_ids=pos).logits
    return per_sample_ce(logits, batch["labels"])


def per_sample_ce(logits: Tensor, labels: Tensor) -> Tensor:
    logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(labels.shape)
    valid = (labels != -100).to(tok.dtype)
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def concat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]], 0) for k in a}


@contextlib.contextmanager
def autocast_ctx(cfg: StepConfig):
    if cfg.autocast == "bf16":
        with torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16):
            yield
    else:
        yield


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---- statistics ---------------------------------------------------------------------------
def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), no numpy needed."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: list[float]) -> dict:
    return {"p20": quantile(times, 0.2), "p50": quantile(times, 0.5), "p80": quantile(times, 0.8),
            "min": min(times), "max": max(times), "rounds": len(times), "times": list(times)}


# ---- environment --------------------------------------------------------------------------
def _version(mod: str) -> str | None:
    try:
        return getattr(importlib.import_module(mod), "__version__", "unknown")
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else None
    except Exception:
        return None


def env_info() -> dict[str, Any]:
    """Hardware, versions and threading, recorded with every result."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(),
               "memory_gib": round(props.total_memory / 2 ** 30, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(),
                     "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                     "machine": platform.machine(), "gpu": gpu,
                     "mem_total_gib": _mem_total_gib(), "loadavg_at_start": load},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton"), "transformers": _version("transformers"),
                     "inrun_kernels": _version("inrun_kernels"), "git": git_rev()},
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in ("INRUN_BACKEND", "INRUN_ROUTE", "OMP_NUM_THREADS",
                                           "MKL_NUM_THREADS", "TRITON_INTERPRET") if k in os.environ},
        "platform": platform.platform(),
    }


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def hardware_line(env: dict) -> str:
    h, v = env["hardware"], env["versions"]
    gpu = h.get("gpu")
    dev = f"GPU {gpu['name']} x{gpu['count']}" if gpu else "no GPU"
    return (f"{h['cpu']}, {h['cores']} cores ({h.get('affinity')} usable), {env['torch_threads']} torch threads, "
            f"{dev}; python {v['python']}, torch {v['torch']}, triton {v['triton']}, "
            f"transformers {v['transformers']}, inrun_kernels {v['inrun_kernels']} ({v.get('git')})")
