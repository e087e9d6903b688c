"""Karvonen 2025's short KL + MSE fine-tune on the embedded model, against a full e2e run of the same size.

    OMP_NUM_THREADS=1 python benchmarks/finetune_embedded.py [--out benchmarks/results/finetune_embedded_<machine>.json]

For ReLU and TopK: a local (MSE) SAE trained on the preset's budget (`fastsae train embedded-local`,
400k tokens), fine-tuned for 10 % more tokens with KL + MSE (`fastsae finetune RUN --model embedded
--fraction 0.1`), against an e2e SAE of the same size and budget (`fastsae train embedded`) and a
control: the same 10 % more tokens at the same learning rate on MSE alone (what part of the gain is
only more training). Then how the fine-tunes move with 5x the learning rate (and its MSE-only
control: the source runs end unconverged, so a larger rate also gains by training on) and, for
TopK, with 2.5x the tokens. Each run is a fresh process; its held-out metrics come from its eval.json (the
fine-tunes' "before" is the local SAE on the same held-out tokens). The README's fine-tune table is
generated from the JSON (benchmarks/readme_tables.py).
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
K = 32  # TopK's k: a CE gap of the same order as the local ReLU's (k = 64 leaves almost none to close)
TOPK = ["--set", "saes.activation=topk", "--set", f"saes.k={K}", "--set", "loss.sparsity_coeff=0"]
FRACTION = "0.1"
MSE_ONLY = ["--set", "loss.balance=null", "--set", "loss.kl_coeff=0"]


LR = ["--set", "optim.lr=1e-3"]  # 5x the source runs' final 2e-4


def runs(work: Path) -> list[tuple[str, str, str, list[str]]]:
    """(name, kind, label, fastsae arguments) in the order they run (a fine-tune after its source)."""
    out = []
    for act, extra in (("relu", []), ("topk", TOPK)):
        local = str(work / f"local-{act}")

        def tune(name, kind, label, *more, fraction=FRACTION, local=local):
            return (name, kind, label, ["finetune", local, "--model", "embedded", "--fraction", fraction, *more,
                                        "--run-dir", str(work / name)])

        out += [(f"local-{act}", "local", "local (MSE), the preset's 400k tokens",
                 ["train", "embedded-local", *extra, "--run-dir", local]),
                tune(f"finetune-{act}", "finetune", "+ 10 % more tokens of KL + MSE"),
                tune(f"mse-only-{act}", "mse-only", "+ 10 % more tokens of MSE alone (control)", *MSE_ONLY),
                (f"e2e-{act}", "e2e", "e2e (KL), 400k tokens",
                 ["train", "embedded", *extra, "--run-dir", str(work / f"e2e-{act}")]),
                tune(f"finetune-{act}-lr", "finetune", "+ 10 % KL + MSE at lr 1e-3 (5x)", *LR),
                tune(f"mse-only-{act}-lr", "mse-only", "+ 10 % MSE alone at lr 1e-3 (control)", *MSE_ONLY, *LR)]
        if act == "topk":
            out.append(tune(f"finetune-{act}-25", "finetune", "+ 25 % more tokens of KL + MSE", fraction="0.25"))
    return out


def metrics(record: dict, hook: str) -> dict:
    out = {name: record[name] for name in ("ce_increase", "kl", "ce_orig", "l0") if name in record}
    for name in ("explained_variance", "alive"):
        out[name] = record[f"{name}/{hook}"]
    return out


def run(name: str, kind: str, label: str, args: list[str], work: Path) -> dict:
    command = [sys.executable, "-m", "fastsae", *args, "--set", "log.progress=false"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads((work / name / "eval.json").read_text())
    hook = record["hooks"][0]
    shown = shlex.join(["fastsae", *args]).replace(str(work) + "/", "runs/")
    out = dict(name=name, kind=kind, label=label, activation=record["activation"], k=record["k"], command=shown,
               seconds=seconds, training_tokens=record["training_tokens"], n_latents=record["n_latents"],
               after=metrics(record["metrics"], hook))
    if "before" in record:
        out["before"] = metrics(record["before"], hook)
        out["finetune"] = {key: record["finetune"][key] for key in ("budget", "coefficients")}
    return out


def summary(results: list[dict]) -> list[dict]:
    """Per activation: the CE-gap reduction of the fine-tune, of the MSE-only control and of the e2e
    run, each against the local SAE's gap on the same held-out tokens."""
    by = {r["name"]: r for r in results}
    rows = []
    for act in ("relu", "topk"):
        local = by[f"local-{act}"]["after"]["ce_increase"]

        def reduction(name, local=local):
            return 1 - by[name]["after"]["ce_increase"] / local

        rows.append(dict(activation=act, local_gap=local, finetune_gap=by[f"finetune-{act}"]["after"]["ce_increase"],
                         mse_only_gap=by[f"mse-only-{act}"]["after"]["ce_increase"],
                         e2e_gap=by[f"e2e-{act}"]["after"]["ce_increase"],
                         finetune_reduction=reduction(f"finetune-{act}"), mse_only_reduction=reduction(f"mse-only-{act}"),
                         e2e_reduction=reduction(f"e2e-{act}")))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument("--work", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastsae-finetune-") as tmp:
        work = Path(args.work or tmp)
        results = []
        for name, kind, label, fastsae_args in runs(work):
            results.append(run(name, kind, label, fastsae_args, work))
            print(json.dumps(results[-1]), flush=True)
    record = script_record("benchmarks/finetune_embedded.py", ["--out", args.out] if args.out else [],
                           threads=os.environ.get("OMP_NUM_THREADS"), runs=results, summary=summary(results))
    print(json.dumps(record["summary"], indent=1))
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
