"""Project-wide pytest configuration: the `--benchmark` switch.

    pytest                      the tests (tests/, pyproject's testpaths); never the benchmarks
    pytest --benchmark          the kernel profiling suite (benchmarks/) alone, with one compact
                                report per op at the end (benchmarks/harness.py)

pytest-benchmark's own options work beside it (--benchmark-save, --benchmark-compare,
--benchmark-json, --benchmark-disable, ...); under --benchmark, --benchmark-max-time defaults to
0.5 s instead of 1 s. `--benchmark` is matched exactly: pytest's parser
turns argparse's prefix matching off, so it cannot be taken for --benchmark-only or the reverse.

This file sits at the repository root so that it is loaded before the command line is parsed
(options must be registered by an initial conftest). It imports nothing heavy: a plain test run
pays nothing for it. The options reach the benchmark files (whose parametrisation is decided at
import time) and their memory probes as environment variables.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent / "benchmarks"
DEFAULT_MAX_TIME = 0.5  # seconds of timing per benchmark row, unless --benchmark-max-time says otherwise


def pytest_addoption(parser):
    group = parser.getgroup("fastsae-bench", "fastsae kernel profiling (pytest --benchmark)")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the kernel profiling suite in benchmarks/ instead of the tests")
    group.addoption("--bench-size", choices=("small", "full"), default=None,
                    help="benchmark shapes: 'full' (the GPT-2 preset and d=4096 on a GPU; the README's "
                         "CPU figures on CPU) or 'small'. Default: full on CUDA, small on CPU "
                         "(env FASTSAE_BENCH_SIZE)")
    group.addoption("--bench-interpreter", action="store_true", default=False,
                    help="on CPU, also time the Triton kernels under Triton's interpreter (left out by "
                         "default: interpreter timings say nothing about GPU speed)")
    group.addoption("--bench-out", default=None, metavar="PATH",
                    help="where the run's results JSON goes: a .json file, or a directory "
                         "(default: benchmarks/out/, not tracked by git)")


def pytest_configure(config):
    for option, variable in (("bench_size", "FASTSAE_BENCH_SIZE"), ("bench_out", "FASTSAE_BENCH_OUT")):
        value = config.getoption(option)
        if value is not None:
            os.environ[variable] = str(value)
    if config.getoption("bench_interpreter"):
        os.environ["FASTSAE_BENCH_INTERPRETER"] = "1"
    if not config.getoption("benchmark"):
        return
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("--benchmark needs pytest-benchmark (pip install -e '.[dev]'), "
                                "which is not installed or disabled with -p no:benchmark")
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        # No paths on the command line: profile instead of testing (testpaths names tests/).
        config.args[:] = [str(BENCH_DIR)]
    if not any(arg.startswith("--benchmark-max-time") for arg in config.invocation_params.args):
        # pytest-benchmark times each row for 1 s by default (at least 5 rounds); half a second keeps
        # the whole CPU run short and still gives p20/p80 enough rounds.
        config.option.benchmark_max_time = DEFAULT_MAX_TIME


def pytest_collection_modifyitems(config, items):
    """Under --benchmark, tests named on the command line outside benchmarks/ are deselected."""
    if not config.getoption("benchmark"):
        return
    outside = [item for item in items if BENCH_DIR not in item.path.resolve().parents]
    if outside:
        config.hook.pytest_deselected(items=outside)
        items[:] = [item for item in items if BENCH_DIR in item.path.resolve().parents]
