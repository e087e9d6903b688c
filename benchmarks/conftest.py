"""pytest hooks of the profiling suite (`pytest --benchmark`; the helpers live in harness.py).

- The per-op reports (harness.report_lines) replace pytest-benchmark's own table, which is about
  230 columns wide. That table still prints where it carries something ours does not: with
  --benchmark-compare (the saved runs' rows beside this one's) or --benchmark-histogram.
- Every timed row goes to one JSON file (device, its peaks, versions, size, command line, rows),
  rewritten after each benchmark so that a run stopped part-way keeps what it measured:
  benchmarks/out/<date>_<size>_<device>.json by default (not tracked by git), or the file /
  directory given with --bench-out. Nothing is written into tracked files.
  --benchmark-json / --benchmark-save still write pytest-benchmark's files, the rows included
  (extra_info).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
from harness import bench_size, device_name, device_peaks, device_slug, include_interpreted, report_lines, versions

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def _bench_session(config):
    return getattr(config, "_benchmarksession", None)


def _records(config) -> list[dict]:
    session = _bench_session(config)
    if session is None or session.disabled:
        return []
    return [dict(bench.extra_info, name=bench.name) for bench in session.benchmarks
            if bench.stats and "median_s" in bench.extra_info]


def _out_path() -> Path:
    """--bench-out (a .json file or a directory; the root conftest.py passes it as FASTSAE_BENCH_OUT)."""
    out = os.environ.get("FASTSAE_BENCH_OUT")
    if out and out.endswith(".json"):
        return Path(out)
    directory = Path(out) if out else DEFAULT_OUT
    return directory / f"{time.strftime('%Y%m%d-%H%M%S')}_{bench_size()}_{device_slug()}.json"


def _command_line() -> str:
    """The command as typed: `python -m pytest` for pytest's own entry, arguments quoted."""
    argv = list(sys.argv)
    if argv and argv[0].replace("\\", "/").endswith(("pytest/__main__.py", "/pytest", "py.test")):
        argv[:1] = ["python", "-m", "pytest"]
    return shlex.join(argv)


def _write_results(config) -> None:
    records = _records(config)
    if not records:
        return
    path = getattr(config, "_fastsae_bench_json", None) or _out_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": device_name(), "device_peaks": device_peaks(), "size": bench_size(),
               "interpreter_rows": include_interpreted(), "versions": versions(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": _command_line(),
               "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "rows": records}
    path.write_text(json.dumps(payload, indent=2, default=str))
    config._fastsae_bench_json = path


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Rewritten after every benchmark, so a run stopped part-way (gpu_check's time budgets) keeps
    the rows it measured."""
    _write_results(item.config)


def pytest_sessionfinish(session, exitstatus):
    _write_results(session.config)


@pytest.hookimpl(tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = _bench_session(config)
    if session is None:
        return
    if session.disabled:
        terminalreporter.write_sep("-", "benchmarks ran once each, untimed (--benchmark-disable)")
        return
    if not (session.compare or session.histogram):
        # pytest-benchmark's display: keep its regression check (--benchmark-compare-fail), drop the table
        session.display = lambda tr: session.check_regressions()
    elif not config.getoption("benchmark_columns"):
        session.columns = ["min", "median", "iqr", "rounds"]  # its table, narrowed unless columns were asked for
    records = _records(config)
    if not records:
        return
    terminalreporter.write_sep("=", f"fastsae benchmarks ({bench_size()} shapes)")
    for line in report_lines(records, device_peaks(), device_name()):
        terminalreporter.write_line(line)
    path = getattr(config, "_fastsae_bench_json", None)
    if path is not None:
        terminalreporter.write_line(f"results: {path}")
