"""Shared helpers for the benchmarks (`pytest benchmarks/ --benchmark-only`).

- bench_size(): "full" (the issue's shapes) on CUDA, "small" on CPU; FASTSAE_BENCH_SIZE overrides.
- device_name(): the GPU's name, or the CPU's model.
- cuda_timed(fn): wraps fn so pytest-benchmark's clock reads after the GPU has finished.
- gpu_peak_bytes(fn) / cpu_peak_extra_bytes(script): peak memory of one call.
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

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

RESULTS_DIR = Path(__file__).parent / "results"


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


def cpu_peak_extra_bytes(script: str, timeout: float = 600) -> int:
    """Peak RSS growth of run(state) over the RSS after state = setup(), in a fresh process.

    ``script`` defines setup() and run(state). torch's CPU allocations are invisible to
    tracemalloc, so the kernel's own high-water mark (ru_maxrss) is read instead.
    """
    driver = textwrap.dedent(script) + textwrap.dedent("""
        import gc, json, resource, torch
        torch.set_num_threads(torch.get_num_threads())
        _state = setup()
        gc.collect()
        _base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(_state)
        _peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("PEAK_EXTRA_KB", json.dumps(_peak - _base))
    """)
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-4000:]}")
    kb = int(out.stdout.split("PEAK_EXTRA_KB")[-1].strip())
    return kb * 1024  # ru_maxrss is in KiB on Linux


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
