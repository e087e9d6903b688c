"""The checkout as a user runs it: from the repository root, whose folder `kernels/` must never be
imported in place of PyPI's `kernels` (Hugging Face's, which transformers >= 5.25 imports for every
model), while it stays importable as `fastsae.kernels`.

`python -m ...`, `torchrun -m ...` and pytest put the working directory (or the rootdir) first on
`sys.path`; each check runs `python` in a subprocess whose working directory is the repo root, with
the root first on `sys.path` as `python -m` puts it. `torchrun -m fastsae train` from the root runs
in tests/test_benchmarks.py (gpu_check's distributed part at smoke size, cwd the repo root).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_in_root(code: str, *, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, ''); {code}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_kernels_folder_is_not_a_regular_package():
    """A folder with an __init__.py on sys.path is a regular package and shadows any installed one."""
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_top_level_kernels_is_never_ours():
    result = _run_in_root(
        "import importlib.util as u, pathlib; s = u.find_spec('kernels'); "
        "print('none' if s is None else s.origin or list(s.submodule_search_locations))")
    assert result.returncode == 0, result.stderr
    found = result.stdout.strip()
    if importlib.util.find_spec("kernels") is not None and found != "none":
        # an installed `kernels` (transformers >= 5.25 depends on it) must win over the checkout's folder
        assert "site-packages" in found or "dist-packages" in found, found


def test_fastsae_kernels_imports_from_the_root():
    result = _run_in_root("import fastsae.kernels._logits as m; print(m.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == ROOT / "kernels" / "_logits.py"


def test_transformers_gpt2_imports_from_the_root():
    """transformers' model modules import `kernels` (hub_kernels); from the root that must be PyPI's."""
    pytest.importorskip("transformers")
    result = _run_in_root("import fastsae.kernels, transformers.models.gpt2.modeling_gpt2 as m; "
                          "print(m.GPT2LMHeadModel.__name__)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "GPT2LMHeadModel"


def test_python_m_fastsae_from_the_root():
    result = subprocess.run([sys.executable, "-m", "fastsae", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train" in result.stdout


@pytest.mark.parametrize("preset, torch_first, want", [(None, False, "10000"), ("5", False, "5"), (None, True, "unset")])
def test_fastsae_shortens_openmp_spin_wait_before_torch_loads(preset, torch_first, want):
    """fastsae/_openmp.py: GOMP_SPINCOUNT=10000 for a process that imports fastsae before torch,
    unless the environment sets it; a process that loaded torch first keeps its runtime's setting."""
    env = {key: value for key, value in os.environ.items() if key != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    code = ("import torch; " if torch_first else "") + "import fastsae, os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == want
