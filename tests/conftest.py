import os

# Triton's interpreter must be chosen before any kernel is defined (STYLE.md): set it before the
# package is imported, so the Triton kernels run on CPU tensors in CI.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
