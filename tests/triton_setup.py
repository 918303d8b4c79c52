"""Where the Triton kernel tests run, shared by the test files that import it: the CPU
interpreter (TRITON_INTERPRET=1, set by conftest) on CPU tensors, else compiled kernels on CUDA.
Importing it skips the importing test module when triton is missing, or when neither a GPU nor
the interpreter is there."""
import pytest
import torch

pytest.importorskip("triton")
from inrun_kernels.kernels import configs as C  # noqa: E402

INTERPRET = C.interpreting()
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
if not INTERPRET and DEVICE.type != "cuda":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU with compiled Triton kernels")


def poison_outputs(monkeypatch) -> None:
    """Kernel outputs start as NaN (configs.empty patched): unwritten entries fail the comparison."""
    def nan_empty(shape, device, dtype=torch.float32):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    monkeypatch.setattr(C, "empty", nan_empty)
