"""CI's performance guard: the CPU paths people run against the code they replace, timed interleaved
in one process, idle and with a competing process the guard starts itself; it fails when a ratio
passes its bound.

    python benchmarks/perf_guard.py [--threads 2] [--conditions idle,busy] [--out FILE.json]

Comparisons (fastsae / baseline, each the best of ROUNDS calls, the two timed alternately):

    kl            ops.fused_linear_kl's PyTorch reference, forward + backward, N 1,024, d 256,
                  V 50,257, fp32, against the naive form (logits, log_softmax, kl_div(batchmean))
    kl_gpt2       the same at the GPT-2 preset's N 2,048 and d 768 (not in CI's default set: slow)
    relu_dense    ops.relu_autoencode (forward, MSE + L1 backward) against relu_encode + dense_decode
                  (the path it replaced), N 1,024, d 256, 16,384 latents, a fresh SAE's code (half
                  the latents active)
    relu_sparse   the same with a trained SAE's code (b_enc = -3: about 0.1 % active)
    relu_dense_wide  relu_dense at 262,144 latents, where the reference recomputes most dense rows'
                  code in backward to keep its memory bound (not in CI's default set: slow)
    e2e_step      Trainer.step (e2e, ReLU SAE of 4,096 latents at layer 2 of a 4-layer d 256
                  GPT-2, V 50,257, 8 x 128 tokens) against the paper code's step on the same model
                  (benchmarks/bench_e2e_step.py: full clean and hooked runs with logits, kl_div)

Conditions: "idle" (nothing started by the guard; the machine as it is) and "busy" (one process
spinning at normal priority beside the timed one, started and stopped by the guard), each at every
thread count in --threads (torch.set_num_threads). A shared machine makes a descheduled OpenMP
thread wait at every op's barrier (GUIDE section 3): the busy condition is where a path of many
small ops loses to the naive code, which an idle timing does not show.

Bounds (BOUNDS) are generous, for CI's noisy machines: they catch a path that loses to what it
replaced, not a few percent. A ratio over its bound is measured once more (the same pair, thread
count and condition) and fails only if that second measurement is over it too: a path that loses
loses twice, while one measurement's rounds can all fall on a descheduled stretch of a shared
machine (CI once saw relu_sparse at 2 threads, busy, at 0.99 where four reruns gave 0.44-0.63; the
code before the guard lost at 1.3-2.8 every time). The record keeps both measurements. The JSON records every round's seconds, the ratios, the bounds, the
device, the versions, the date and the load average; benchmarks/results/perf_guard_<machine>.json
is the committed record the README's table is generated from (benchmarks/readme_tables.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name, versions  # noqa: E402

from fastsae import ops  # noqa: E402

ROUNDS = 3
# fastsae / baseline may not pass these (best of ROUNDS, interleaved). Measured on the project's
# 2-core CPU machine (benchmarks/results/perf_guard_*.json): kl 0.4-0.6, relu_dense 0.8-0.95,
# relu_sparse 0.5-0.65, e2e_step 0.6-0.8 in every condition; the code before the guard: kl 1.6 and
# relu_dense 1.6 busy at 2 threads.
BOUNDS = {"kl": 0.85, "relu_dense": 1.15, "relu_sparse": 0.9, "e2e_step": 1.0, "kl_gpt2": 0.85,
          "relu_dense_wide": 1.15}
# What CI runs (about 2 minutes at 1 and 2 threads); kl_gpt2 and relu_dense_wide (2 to 14 s a call)
# only with --only, for the committed record.
COMPARISONS = ("kl", "relu_dense", "relu_sparse", "e2e_step")


def kl_pair(n: int = 1024, d: int = 256, v: int = 50_257):
    g = torch.Generator().manual_seed(0)
    h_orig = torch.randn(n, d, generator=g)
    h_sae = (h_orig + 0.3 * torch.randn(n, d, generator=g)).requires_grad_()
    W_U = torch.randn(d, v, generator=g) / d**0.5 * 3
    b_U = torch.randn(v, generator=g)

    def fastsae():
        h_sae.grad = None
        ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, backend="torch").backward()

    def naive():
        h_sae.grad = None
        log_q = F.log_softmax(h_sae @ W_U + b_U, dim=-1)
        log_p = F.log_softmax(h_orig @ W_U + b_U, dim=-1)
        F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").backward()

    return fastsae, naive


def relu_pair(code: str, n_latents: int = 16_384):
    from bench_relu_autoencoder import make_step

    shape = (1024, 256, n_latents)
    return make_step(shape, code, "reference", "fwd_bwd"), make_step(shape, code, "encode_decode", "fwd_bwd")


def e2e_pair():
    from bench_e2e_step import build

    shape = dict(n_layer=4, d_model=256, n_head=4, d_vocab=50_257, batch=8, ctx=128, n_latents=4096)
    return build("fastsae e2e", shape, "cpu"), build("paper e2e", shape, "cpu")


PAIRS = {"kl": kl_pair, "relu_dense": lambda: relu_pair("dense"), "relu_sparse": lambda: relu_pair("sparse"),
         "e2e_step": e2e_pair, "kl_gpt2": lambda: kl_pair(2048, 768),
         "relu_dense_wide": lambda: relu_pair("dense", 262_144)}


def time_pair(fastsae, baseline, rounds: int = ROUNDS) -> dict:
    """Each callable once to warm up, then `rounds` alternating timed calls of each."""
    fastsae()
    baseline()
    seconds = {"fastsae": [], "baseline": []}
    for _ in range(rounds):
        for name, fn in (("fastsae", fastsae), ("baseline", baseline)):
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in seconds.items()}
    return dict(seconds=seconds, best=best, ratio=best["fastsae"] / best["baseline"])


class Competitor:
    """One process spinning at normal priority while the block runs (the "busy" condition)."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)  # let it reach the run queue
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def measure(fastsae, baseline, rounds: int, condition: str) -> dict:
    """time_pair in a condition: "busy" with a Competitor running, "idle" as the machine is."""
    if condition == "busy":
        with Competitor():
            return time_pair(fastsae, baseline, rounds)
    return time_pair(fastsae, baseline, rounds)


def run(threads: list[int], conditions: list[str], comparisons: list[str], rounds: int) -> dict:
    """Each comparison in turn (its inputs, models and optimizers alone in memory while it is timed),
    at every thread count and condition."""
    results = []
    default_threads = torch.get_num_threads()
    for name in comparisons:
        fastsae, baseline = PAIRS[name]()
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for condition in conditions:
                timing = measure(fastsae, baseline, rounds, condition)
                first = None
                if timing["ratio"] > BOUNDS[name]:  # a second look before failing (see the module docstring)
                    print(f"{name:<12} threads={n_threads} {condition:<5} ratio {timing['ratio']:.2f} over its bound "
                          f"{BOUNDS[name]}: measuring it again", flush=True)
                    first, timing = timing, measure(fastsae, baseline, rounds, condition)
                passed = timing["ratio"] <= BOUNDS[name]
                results.append(dict(comparison=name, threads=n_threads, condition=condition, bound=BOUNDS[name],
                                    passed=passed, **timing, **({"first_measurement": first} if first else {})))
                print(f"{name:<12} threads={n_threads} {condition:<5} fastsae {timing['best']['fastsae']:7.3f} s  "
                      f"baseline {timing['best']['baseline']:7.3f} s  ratio {timing['ratio']:.2f}  "
                      f"(bound {BOUNDS[name]}){'' if passed else '  FAIL'}", flush=True)
        del fastsae, baseline
        gc.collect()
        torch.set_num_threads(default_threads)
    return dict(device=device_name(), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                load_average_1min=os.getloadavg()[0], cpu_count=os.cpu_count(), rounds=rounds,
                command=shlex.join(["python", "benchmarks/perf_guard.py", *sys.argv[1:]]), results=results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated torch thread counts (default: torch's count)")
    parser.add_argument("--conditions", default="idle,busy", help="idle and/or busy (default: both)")
    parser.add_argument("--only", default=",".join(COMPARISONS),
                        help=f"comma-separated comparisons (default: {','.join(COMPARISONS)}; also: "
                             "kl_gpt2, relu_dense_wide)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    conditions = args.conditions.split(",")
    comparisons = args.only.split(",")
    for name in comparisons:
        if name not in BOUNDS:
            parser.error(f"--only: no comparison {name!r}; expected some of {', '.join(BOUNDS)}")
    for condition in conditions:
        if condition not in ("idle", "busy"):
            parser.error(f"--conditions: {condition!r} is not idle or busy")
    record = run(threads, conditions, comparisons, args.rounds)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    failed = [r for r in record["results"] if not r["passed"]]
    for r in failed:
        print(f"perf guard: {r['comparison']} at {r['threads']} threads, {r['condition']}: fastsae / baseline "
              f"{r['ratio']:.2f} > {r['bound']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
