"""SAEBench's core metrics of the embedded model's SAEs: the three presets, and optionally the sweep.

    python benchmarks/saebench_embedded.py [--sweep] [--out benchmarks/results/saebench_embedded_<machine>.json]

Each preset is trained as a user runs it (`fastsae train PRESET` in a fresh run directory), then
evaluated twice on the same held-out tokens, timed from outside: `fastsae eval RUN` and
`fastsae eval RUN --saebench core.json` (the second adds SAEBench's zero-ablated pass and metrics).
With --sweep, `fastsae sweep` (the default embedded grid) is trained too and every point evaluated
with --saebench. The record keeps each SAE's SAEBench metrics (eval_result_metrics), the eval
tokens and both eval times; the README's SAEBench table is generated from it
(benchmarks/readme_tables.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import script_record, write_record  # noqa: E402

PRESETS = ("embedded", "embedded-local", "embedded-e2e-ds")


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def evaluate(run_dir: Path, label: str, *, plain: bool) -> dict:
    """SAEBench's record of a run's SAE (and, with plain, the time of the eval without it)."""
    core = run_dir / "saebench_core.json"
    plain_seconds = timed(["fastsae", "eval", str(run_dir)]) if plain else None
    saebench_seconds = timed(["fastsae", "eval", str(run_dir), "--saebench", str(core)])
    record = json.loads(core.read_text())
    ours = json.loads((run_dir / "eval.json").read_text())
    return {"label": label, "objective": ours["objective"], "sparsity_coeff": ours["sparsity_coeff"], "hooks": ours["hooks"],
            "n_latents": ours["n_latents"], "eval_tokens": ours["eval_tokens"],
            "fastsae_metrics": {k: ours["metrics"][k] for k in ("kl", "ce_increase", "l0") if k in ours["metrics"]},
            "eval_seconds": plain_seconds, "eval_saebench_seconds": saebench_seconds,
            "saebench": {"eval_result_metrics": record["eval_result_metrics"],
                         "eval_result_unstructured": record["eval_result_unstructured"],
                         "eval_config": record["eval_config"]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also the default embedded sweep's points")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="fastsae-saebench-") as tmp:
        for preset in PRESETS:
            run_dir = Path(tmp) / preset
            train_seconds = timed(["fastsae", "train", preset, "--run-dir", str(run_dir)])
            results.append(dict(preset=preset, train_seconds=train_seconds, **evaluate(run_dir, preset, plain=True)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "saebench"}), flush=True)
        if args.sweep:
            sweep_dir = Path(tmp) / "sweep"
            timed(["fastsae", "sweep", "--out", str(sweep_dir)])
            for run_dir in sorted(p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file()):
                results.append(dict(sweep_point=run_dir.name, **evaluate(run_dir, run_dir.name, plain=False)))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "saebench"}), flush=True)
    record = script_record("benchmarks/saebench_embedded.py", argv if argv is not None else sys.argv[1:],
                           results=results)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
