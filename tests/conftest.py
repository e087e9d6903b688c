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


# The tiny GPT-2 the trainer, eval, sync and distributed tests train on (3 layers, d_model 32, random
# weights): saved once per session; each test module loads its own LanguageModel.
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from helpers_models import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), n_layer=3, n_embd=32, n_ctx=64)


@pytest.fixture(scope="module")
def lm(model_dir):
    from fastsae.model.lm import LanguageModel

    return LanguageModel.load(str(model_dir))

