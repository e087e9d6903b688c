"""fused_linear_kl, forward + backward: the fused Triton kernel vs the chunked PyTorch reference vs
the naive dense form (materialized logits, log_softmax, kl_div(batchmean), autograd backward).

    pytest benchmarks/bench_linear_kl.py --benchmark-only               # measure
    FASTSAE_BENCH_SIZE=full pytest benchmarks/bench_linear_kl.py ...    # the issue's shapes

Full size (GPU): d = 768, V = 50,257 at N = 2,048 / 8,192 / 32,768, and d = 4,096, V = 128,256.
Small size (CPU default): tiny shapes, so that CI's --benchmark-disable run is quick (the fused
kernel then runs in Triton's interpreter: its CPU time means nothing). On CPU with
FASTSAE_BENCH_SIZE=full only the CPU target runs: reference vs naive at N = 2,048, d = 768,
V = 50,257. extra_info: device, dtype, shapes, effective TFLOP/s against the cost model's floor of
6*N*d*V FLOPs (GUIDE section 5), peak extra memory of one forward + backward. The results JSON
(benchmarks/results/bench_linear_kl_<size>_<device>.json) is written by benchmarks/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import HAS_CUDA, bench_size, cuda_timed, device_name, gpu_peak_bytes

IMPLS = ("fused", "reference", "naive")

# (N, d_model, d_vocab, dtype)
GPU_FULL = [(2048, 768, 50257, "bfloat16"), (8192, 768, 50257, "bfloat16"), (32768, 768, 50257, "bfloat16"),
            (8192, 4096, 128256, "bfloat16")]
CPU_TARGET = [(2048, 768, 50257, "float32")]  # the reference's CPU target (issue 4): <= 1.2x naive
SMALL = [(64, 64, 500, "float32"), (48, 96, 1000, "float32")]


def cases():
    if bench_size() == "small":
        return [(impl, shape) for shape in SMALL for impl in IMPLS]
    if HAS_CUDA:
        return [(impl, shape) for shape in GPU_FULL for impl in IMPLS]
    return [(impl, shape) for shape in CPU_TARGET for impl in ("reference", "naive")]


# The setup and the step are one source text: run here, and in the subprocess that measures CPU
# peak memory (ru_maxrss) for the same step.
_SETUP = """
import torch, torch.nn.functional as F
from fastsae import ops

def setup(impl={impl!r}, n={n}, d={d}, v={v}, dtype={dtype!r}, device={device!r}):
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    h_orig = torch.randn(n, d, generator=gen)
    h_sae = (h_orig + 0.3 * torch.randn(n, d, generator=gen)).to(device, dt).requires_grad_()
    W_U = (torch.randn(d, v, generator=gen) / d ** 0.5 * 3).to(device, dt)
    b_U = torch.randn(v, generator=gen).to(device, dt)
    return impl, h_sae, h_orig.to(device, dt), W_U, b_U

def run(state):
    impl, h_sae, h_orig, W_U, b_U = state
    h_sae.grad = None
    if impl == "naive":
        log_q = F.log_softmax((h_sae @ W_U + b_U).float(), dim=-1)
        log_p = F.log_softmax((h_orig @ W_U + b_U).float(), dim=-1)
        loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    else:
        loss = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, backend="triton" if impl == "fused" else "torch")
    loss.backward()
    return loss
"""


_PROBE = """
import gc, resource

def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

_state = setup()
gc.collect()
try:  # Linux: restart the peak-RSS counter here, so neither setup's temporaries nor the parent count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _base = _status_kib("VmRSS")
    run(_state)
    _extra = _status_kib("VmHWM") - _base
except OSError:  # no /proc: ru_maxrss (may start at the parent's peak, see cpu_peak_extra_mib)
    _base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(_state)
    _extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _base
print("PEAK_EXTRA_KIB", _extra)
"""


def cpu_peak_extra_mib(source: str) -> float:
    """Peak RSS growth of run(setup()) in a fresh process, in MiB.

    Not benchmarks/conftest.py's cpu_peak_extra_bytes: a child's ru_maxrss starts at the
    parent's peak RSS (Linux carries it across fork + exec; measured: 944 MB at the child's first
    line under pytest), which hides any step smaller than the pytest process. The kernel's
    per-process counter VmHWM, reset after setup through /proc/self/clear_refs, does not.
    """
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(source) + _PROBE], capture_output=True,
                         text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-4000:]}")
    return int(out.stdout.split("PEAK_EXTRA_KIB")[-1]) / 1024


def _naive_fits_gpu(n, v) -> bool:
    # naive holds ~6 [N, V] fp32 tensors at its peak (logits, log-softmaxes, their gradients)
    return 6 * n * v * 4 < 0.8 * torch.cuda.get_device_properties(0).total_memory


@pytest.mark.parametrize("impl, shape", cases(), ids=lambda x: x if isinstance(x, str) else "N{}-d{}-V{}-{}".format(*x))
def test_linear_kl_forward_backward(benchmark, impl, shape):
    n, d, v, dtype = shape
    device = "cuda" if HAS_CUDA else "cpu"
    if HAS_CUDA and impl == "naive" and not _naive_fits_gpu(n, v):
        pytest.skip(f"naive form needs ~{6 * n * v * 4 / 2**30:.0f} GiB at N={n}, V={v}")
    source = _SETUP.format(impl=impl, n=n, d=d, v=v, dtype=dtype, device=device)
    namespace: dict = {}
    exec(source, namespace)
    state = namespace["setup"]()
    step = cuda_timed(lambda: namespace["run"](state))

    benchmark.group = f"linear_kl N={n} d={d} V={v} {dtype}"
    slow = not HAS_CUDA and bench_size() == "full"  # seconds per call on CPU
    if slow:
        benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    else:
        benchmark(step)

    info = dict(device=device_name(), impl=impl, dtype=dtype, n_tokens=n, d_model=d, d_vocab=v,
                flop_floor=6 * n * d * v)
    if not benchmark.disabled:
        seconds = benchmark.stats.stats.median
        info["median_ms"] = seconds * 1e3
        info["effective_tflops"] = 6 * n * d * v / seconds / 1e12
        if HAS_CUDA:
            info["peak_extra_mib"] = gpu_peak_bytes(step) / 2**20
        else:
            info["peak_extra_mib"] = cpu_peak_extra_mib(source)
    benchmark.extra_info.update(info)
    del state, namespace
