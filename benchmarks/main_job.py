"""The README's main job and presets, timed as a user runs them: `fastsae train PRESET` in a fresh
process and run directory, idle and with a competing process, with the embedded model cached (warm)
and, for the main job, into an empty cache (cold: pretraining included).

    python benchmarks/main_job.py [--cold] [--out benchmarks/results/main_job_<machine>.json]

Each run records its wall time and its held-out metrics (eval.json); a failed run stops the script. "busy": one process spinning at normal priority
for the whole run, as CI's shared machines often are. The README's main-job and presets tables are
generated from the JSON (benchmarks/readme_tables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import script_record, write_record  # noqa: E402
from perf_guard import Competitor  # noqa: E402

PRESETS = ("embedded", "embedded-local", "embedded-e2e-ds")


def _eval_metrics(run_dir: Path) -> dict:
    record = json.loads((run_dir / "eval.json").read_text())
    metrics, hooks = record["metrics"], record["hooks"]
    out = {name: metrics[name] for name in ("kl", "ce_increase", "l0") if name in metrics}
    for name in ("explained_variance", "alive"):
        key = f"{name}/{hooks[0]}"
        if key in metrics:
            out[name] = metrics[key]
    out["n_latents"], out["training_tokens"] = record["n_latents"], record["training_tokens"]
    return out


def run_once(preset: str, condition: str, cache: str) -> dict:
    """`fastsae train PRESET` in a fresh run directory, timed from outside."""
    with tempfile.TemporaryDirectory(prefix="fastsae-main-job-") as tmp:
        run_dir = Path(tmp) / "run"
        env = dict(os.environ, FASTSAE_CACHE=cache)
        command = ["fastsae", "train", preset, "--run-dir", str(run_dir)]
        start = time.perf_counter()
        if condition == "busy":
            with Competitor():
                done = subprocess.run(command, env=env, capture_output=True, text=True)
        else:
            done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return dict(preset=preset, condition=condition, seconds=seconds, **_eval_metrics(run_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cold", action="store_true", help="also time the main job into an empty cache, idle and busy")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args(argv)
    warm_cache = os.environ.get("FASTSAE_CACHE", str(Path.home() / ".cache" / "fastsae"))
    runs = []
    subprocess.run(["fastsae", "train", "embedded", "--set", "optim.n_tokens=4096", "--set", "eval.n_tokens=2048",
                    "--run-dir", tempfile.mkdtemp(prefix="fastsae-warmup-")], env=dict(os.environ, FASTSAE_CACHE=warm_cache),
                   capture_output=True, check=True)  # the embedded model in the warm cache
    for preset in PRESETS:
        for condition in ("idle", "busy") if preset == "embedded" else ("idle",):
            runs.append(dict(cache="warm", **run_once(preset, condition, warm_cache)))
            print(json.dumps(runs[-1]), flush=True)
    if args.cold:
        for condition in ("idle", "busy"):
            with tempfile.TemporaryDirectory(prefix="fastsae-cold-cache-") as cache:
                runs.append(dict(cache="cold", **run_once("embedded", condition, cache)))
            print(json.dumps(runs[-1]), flush=True)
    record = script_record("benchmarks/main_job.py", argv if argv is not None else sys.argv[1:], runs=runs)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
