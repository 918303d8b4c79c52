"""The README's self-contained Python examples run as written (accumulation, torch.compile,
results and report), each in a fresh interpreter in a temporary folder."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    out = {}
    for m in re.finditer(r"^### (.+?)\n(.*?)(?=^### |^## )", text, flags=re.S | re.M):
        code = re.findall(r"```python\n(.*?)```", m.group(2), flags=re.S)
        if code:
            out[m.group(1).strip()] = code[0]
    return out


@pytest.mark.parametrize("section", ["Gradient accumulation", "torch.compile",
                                     "Results, exports and the report"])
def test_readme_example_runs_as_written(section, tmp_path):
    code = _blocks()[section]
    assert "import inrun_kernels as ik" in code, "the example must be self-contained"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
