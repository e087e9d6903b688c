"""Local against e2e transcoders (with and without a skip path) at block 1's MLP of the embedded model.

    OMP_NUM_THREADS=1 python benchmarks/transcoder_embedded.py [--out benchmarks/results/transcoder_embedded_<machine>.json]

Each point is one `fastsae train` of a preset (fresh process, the preset's 400k tokens): the local
transcoder (`embedded-transcoder`: MSE against the MLP's real output) and the e2e one
(`embedded-transcoder-e2e`: KL of the model with the transcoder's output in place of the MLP's),
and the e2e+ds one (`embedded-transcoder-e2e-ds`: KL + the MSE of the residual after the block),
each without and with its affine skip path (`--set saes.skip=true`), at TopK k = 8, 16 and 32
(`--set saes.k=K`), so every local point has an e2e point at the same k. `--objectives` runs a
subset (each record lists what it ran; the tables read every record of the list RECORDS there). The held-out metrics are
its eval.json's: CE-loss increase with the MLP replaced, KL, the fraction of the MLP output's
variance explained. The README's transcoder table is generated from the JSON
(benchmarks/readme_tables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import script_record, write_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KS = (8, 16, 32)
PRESETS = {"local": "embedded-transcoder", "e2e": "embedded-transcoder-e2e", "e2e+ds": "embedded-transcoder-e2e-ds"}


def points(work: Path, ks=KS, objectives=tuple(PRESETS)) -> list[dict]:
    """Every (objective, skip, k) with its `fastsae train` arguments."""
    out = []
    for k in ks:
        for objective in objectives:
            for skip in (False, True):
                name = f"{objective.replace('+', '-')}-{'skip-' if skip else ''}k{k}"
                out.append(dict(objective=objective, skip=skip, k=k, name=name,
                                args=["train", PRESETS[objective], "--set", f"saes.k={k}",
                                      *(["--set", "saes.skip=true"] if skip else []), "--run-dir", str(work / name)]))
    return out


def run(point: dict, work: Path) -> dict:
    command = [sys.executable, "-m", "fastsae", *point["args"], "--set", "log.progress=false"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads((work / point["name"] / "eval.json").read_text())
    hook = record["hooks"][0]
    metrics = record["metrics"]
    return dict(objective=point["objective"], skip=point["skip"], k=point["k"], hook=hook, seconds=seconds,
                command=shlex.join(["fastsae", *point["args"]]).replace(str(work) + "/", "runs/"),
                training_tokens=record["training_tokens"], n_latents=record["n_latents"],
                ce_increase=metrics["ce_increase"], kl=metrics["kl"], ce_orig=metrics["ce_orig"],
                l0=metrics[f"l0/{hook}"], explained_variance=metrics[f"explained_variance/{hook}"],
                alive=metrics[f"alive/{hook}"])


def summary(results: list[dict]) -> list[dict]:
    """Per k and skip: the e2e transcoder's CE-loss increase as a fraction of the local one's, at
    the same L0."""
    by = {(r["objective"], r["skip"], r["k"]): r for r in results}
    return [dict(k=k, skip=skip, local=by["local", skip, k]["ce_increase"], e2e=by["e2e", skip, k]["ce_increase"],
                 e2e_over_local=by["e2e", skip, k]["ce_increase"] / by["local", skip, k]["ce_increase"])
            for (objective, skip, k) in sorted(by) if objective == "e2e" and ("local", skip, k) in by]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="TopK's k values")
    parser.add_argument("--objectives", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                        help="the presets to run, by objective (default: all)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastsae-transcoder-") as tmp:
        work = Path(args.work or tmp)
        results = []
        for point in points(work, tuple(args.ks), tuple(args.objectives)):
            results.append(run(point, work))
            print(json.dumps(results[-1]), flush=True)
    shown = ((["--out", args.out] if args.out else []) + ([] if tuple(args.ks) == KS else ["--ks", *map(str, args.ks)])
             + ([] if args.objectives == list(PRESETS) else ["--objectives", *args.objectives]))
    record = script_record("benchmarks/transcoder_embedded.py", shown, threads=os.environ.get("OMP_NUM_THREADS"),
                           runs=results, summary=summary(results))
    print(json.dumps(record["summary"], indent=1))
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
