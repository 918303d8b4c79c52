"""DistributedDataParallel and FSDP2 (issue 10, items 2, 3, 6): 2 processes, gloo, CPU.

Each case runs in both ranks (tests/dist_workers.py) and checks, at every optimizer step, that
.grad equals data-parallel training without the engine, that eng.last_values equal a float64
oracle of the GLOBAL step (the union of both ranks' rows, row weights 1 / (W k n_r)), that the
step's ids arrive in rank order on every rank, and at the end that values and counts are
identical on both ranks. Local batch sizes differ between ranks on purpose."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")


def _spawn(case: str, kwargs_list: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(dist_workers.run, args=(2, os.path.join(d, "rendezvous"), case, kwargs_list),
                 nprocs=2, join=True)


def test_ddp_values_grads_and_ledgers_equal_the_global_step():
    _spawn("ddp", [
        # in-backward route (SGD-type first order), one micro-batch, active clipping
        dict(opt_name="sgd_momentum", estimator="first", k=1, sharded_val=False, clip=0.05),
        # optimizer-aware midpoint, accumulation with no_sync (2 micro-batches)
        dict(opt_name="adamw", estimator="midpoint", k=2, sharded_val=False),
        # validation rows sharded across ranks: g_val is the mean over their union
        dict(opt_name="sgd_momentum", estimator="first", k=2, sharded_val=True),
        dict(opt_name="adamw", estimator="second", k=1, sharded_val=True),
    ])


def test_fsdp2_values_and_grads_equal_the_global_step():
    _spawn("fsdp2", [
        dict(opt_name="sgd_momentum", estimator="first", k=1, sharded_val=False),
        dict(opt_name="adamw", estimator="first", k=2, sharded_val=False),
        dict(opt_name="adamw", estimator="midpoint", k=1, sharded_val=True),
    ])


def test_unsupported_distributed_setups_are_refused_by_name():
    """FSDP1, an unwrapped model under an initialised process group (warning), an uncovered
    parameter under DDP, estimator='second' under FSDP2, validation batches of different forms."""
    _spawn("refusals", [{}])
