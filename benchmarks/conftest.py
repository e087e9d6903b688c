"""Shared helpers for the benchmarks (`pytest benchmarks/ --benchmark-only`).

- bench_size(): "full" (the issue's shapes) on CUDA, "small" on CPU; FASTSAE_BENCH_SIZE overrides.
- DEVICE, DTYPE: where and in what dtype the op benchmarks run (cuda + bf16, or cpu + fp32).
- device_name(): the GPU's name, or the CPU's model.
- cuda_timed(fn): wraps fn so pytest-benchmark's clock reads after the GPU has finished.
- time_step(benchmark, step, group, info): time step, record device + info (+ median_ms).
- peak_extra_bytes(step, make_step, *args): peak memory of one call of step: gpu_peak_bytes(step)
  on CUDA, cpu_peak_extra_bytes (a fresh process) on CPU.
- At the end of a run with benchmarks enabled, every benchmark's timings and extra_info are
  written to benchmarks/results/<file>_<device>.json (device, versions, shapes, stats).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

RESULTS_DIR = Path(__file__).parent / "results"
DEVICE = "cuda" if HAS_CUDA else "cpu"
# bf16 is the training dtype on a GPU; the CPU runs the Triton interpreter, benchmarked in fp32.
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def bench_size() -> str:
    size = os.environ.get("FASTSAE_BENCH_SIZE", "full" if HAS_CUDA else "small")
    if size not in ("small", "full"):
        raise ValueError(f"FASTSAE_BENCH_SIZE must be 'small' or 'full', got {size!r}")
    return size


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", ("cuda " if HAS_CUDA else "") + device_name().lower()).strip("-")[:60]


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def cuda_timed(fn):
    """fn, followed by a device synchronize so the timer measures the GPU work."""

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        synchronize()
        return out

    return run


def gpu_peak_bytes(fn) -> int:
    """Peak CUDA memory allocated by one call of fn, above what was allocated before it."""
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - before


# Appended to cpu_peak_extra_bytes's script: the peak RSS growth of run(state), in bytes.
_PEAK_PROBE = """
import gc, resource, sys, torch
torch.set_num_threads(torch.get_num_threads())

def _status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024

def _reset_peak_rss():
    try:  # Linux: VmHWM (the peak RSS) restarts at the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

_state = setup()
gc.collect()
if _reset_peak_rss():
    _base = _status_bytes("VmRSS")
    run(_state)
    _extra = _status_bytes("VmHWM") - _base
else:  # no /proc: ru_maxrss, KiB on Linux, bytes on macOS
    _unit = 1 if sys.platform == "darwin" else 1024
    _base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _unit
    run(_state)
    _extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _unit - _base
print("PEAK_EXTRA_BYTES", _extra)
"""


def cpu_peak_extra_bytes(script: str, timeout: float = 600, env: dict | None = None) -> int:
    """Peak RSS growth of run(state) over the RSS after state = setup(), in a fresh process.

    ``script`` defines setup() and run(state); ``env``: extra environment variables. torch's CPU
    allocations are invisible to tracemalloc, so the process's peak RSS is read. On Linux that is
    VmHWM (/proc/self/status), reset to the current RSS after setup through /proc/self/clear_refs,
    so neither setup's temporaries nor the parent's peak count. Where /proc is absent (macOS) it
    falls back to ru_maxrss, which cannot be reset and starts at the parent's peak RSS (Linux
    carries it across fork + exec; measured: 944 MB at a child's first line under pytest): there a
    run(state) that peaks below setup's or the parent's peak reads as 0.
    """
    driver = textwrap.dedent(script) + _PEAK_PROBE
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"), **(env or {}))
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-4000:]}")
    return int(out.stdout.split("PEAK_EXTRA_BYTES")[-1].strip())


def peak_extra_bytes(step, make_step: Callable, *args, timeout: float = 600, env: dict | None = None,
                     **kwargs) -> int:
    """Peak memory one call of step() adds to what is allocated before it.

    CUDA: gpu_peak_bytes(step). CPU: cpu_peak_extra_bytes in a fresh process, where setup() is
    make_step(*args, **kwargs), which must return a step like this one: make_step is a
    module-level function of a bench file, its arguments literals (their repr is used).
    """
    if HAS_CUDA:
        return gpu_peak_bytes(step)
    bench_file = Path(sys.modules[make_step.__module__].__file__).resolve()
    script = f"""
import sys
sys.path.insert(0, {str(bench_file.parent)!r})
import torch
from {bench_file.stem} import {make_step.__name__} as _make_step

def setup():
    return _make_step(*{args!r}, **{kwargs!r})

def run(step):
    step()
"""
    return cpu_peak_extra_bytes(script, timeout=timeout, env=env)


def time_step(benchmark, step, group: str, info: dict, pedantic: dict | None = None) -> float | None:
    """Time step() with pytest-benchmark (synchronised on CUDA), after recording the device and
    ``info`` in extra_info; ``pedantic``: benchmark.pedantic's options, where the step is slow.

    Returns the median in seconds (also recorded as median_ms), or None where benchmarks are
    disabled (CI's smoke run: one call, no figures).
    """
    benchmark.group = group
    benchmark.extra_info.update(device=device_name(), **info)
    if pedantic is not None and not benchmark.disabled:
        benchmark.pedantic(cuda_timed(step), **pedantic)
    else:
        benchmark(cuda_timed(step))
    if benchmark.disabled:
        return None
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_ms"] = median * 1e3
    return median


def versions() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if HAS_CUDA:
        info["cuda"] = torch.version.cuda
    return info


def pytest_sessionfinish(session, exitstatus):
    """Write each benchmark file's results to benchmarks/results/<file>_<device>.json."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None or bench_session.disabled or not bench_session.benchmarks:
        return
    by_file: dict[str, list] = {}
    for bench in bench_session.benchmarks:
        if not bench.stats:  # skipped or failed before timing
            continue
        stats = bench.stats
        by_file.setdefault(Path(bench.fullname.split("::")[0]).stem, []).append({
            "name": bench.name,
            "group": bench.group,
            "params": {k: str(v) for k, v in (bench.params or {}).items()},
            "median_s": stats.median, "min_s": stats.min, "mean_s": stats.mean,
            "stddev_s": stats.stddev, "rounds": stats.rounds,
            "extra_info": bench.extra_info,
        })
    RESULTS_DIR.mkdir(exist_ok=True)
    for stem, records in by_file.items():
        path = RESULTS_DIR / f"{stem}_{bench_size()}_{device_slug()}.json"
        payload = {"device": device_name(), "size": bench_size(), "versions": versions(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": records}
        path.write_text(json.dumps(payload, indent=2, default=str))
