"""The README's distributed examples run as written: `torchrun --standalone --nproc_per_node 2 examples/X.py`
on CPU (gloo), each printing how many samples every rank valued."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, expect", [("ddp.py", "160 samples valued on 2 ranks"),
                                            ("fsdp2.py", "80 samples valued on 2 ranks (FSDP2)")])
def test_distributed_example_runs(script, expect):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(ROOT / "examples" / script)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout
