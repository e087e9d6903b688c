"""Test setup shared by every test file.

Without CUDA the Triton kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS: the kernels are simply not tested there
    HAS_TRITON = False

# Devices a kernel test runs on: the GPU where there is one, the interpreter on CPU otherwise.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def compile_reports(request):
    """The requesting test file's compile_cases(), compiled for every arch (tests/compile_check.py)."""
    from compile_check import compile_in_subprocess

    return compile_in_subprocess(request.path)
