"""One-shot GPU check: everything worth measuring the first time a GPU is lent, in one JSON.

    python benchmarks/gpu_check.py                 # on one H100 / H200: about 9 minutes
    python benchmarks/gpu_check.py --smoke         # anywhere (CPU too): tiny sizes, every part
                                                   # (Triton under the interpreter: minutes on CPU)

Parts, each in its own process with its own time budget (a part that fails or runs out of time is
recorded with its error and output tail, and the next part runs):

    gpu_tests    python -m pytest -m gpu: the tests that need CUDA (bf16 included)
    bench_<op>   pytest --benchmark --bench-size full, one process per benchmark file: every kernel
                 at the GPT-2 preset shape and the d=4096 shape, fused vs reference vs naive, and the
                 training steps (report rows with fractions of the device's peak)
    train_e2e    50 Trainer steps of the gpt2-e2e preset (GPT-2 small layer 6, 46,080 latents,
                 16 x 1,024 tokens a step) on a random-weight GPT-2 small (12 layers, d 768,
    train_local  V 50,257; a transformers GPT2Config, no hub) on random tokens; and of gpt2-local:
                 step times, tokens/s, peak memory, the fraction of peak of the step's work
    distributed  with 2+ GPUs: `torchrun --nproc-per-node 2 -m fastsae train` (data parallel on
                 NCCL) vs one process, same global batch: the held-out KL must agree (1 %);
                 fewer GPUs: recorded as skipped (--smoke: the same on CPU with gloo)
    kl_dispatch  fused_linear_kl's variants timed per shape class (bf16 and fp32 under TF32, the
                 GPT-2 preset and d=4096 shapes, with and without a gradient): one-sweep kernel,
                 two-pass kernel, loss-only kernel, chunked reference. Which is fastest goes into
                 this JSON and into the measured-dispatch record the op reads under backend
                 "auto" (fastsae/ops/measured_dispatch.json; --dispatch-record; not with --smoke)
    topk_occupancy  the TopK forward at k = 32 with two programs per SM (its config) against one
                 per SM on the 128 x 128 tile, bf16 and TF32, GPT-2 preset: which is faster

Writes benchmarks/results/gpu_check_<device>.json (device, versions, peaks, every part's status,
seconds and results; --smoke: benchmarks/out/, untracked) or the --out path. The training parts
run this file again as a worker (`--worker train`), which prints its result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# Seconds per part on the GPU: about 9 minutes on one H100 / H200 (distributed runs only with 2+
# GPUs). Every BENCH_FILES entry has its own (tests/test_benchmarks.py checks).
BUDGETS = {"gpu_tests": 60, "bench_topk_encoder": 55, "bench_relu_encoder": 40, "bench_sparse_decoder": 35,
           "bench_relu_autoencoder": 45, "bench_linear_kl": 45, "bench_e2e_step": 60, "train_e2e": 60,
           "train_local": 40, "distributed": 60, "kl_dispatch": 80, "topk_occupancy": 30, "bench_matryoshka": 20}
# The parts --parts chooses from ("bench": every BENCH_FILES entry, each its own part).
PARTS = ("gpu_tests", "bench", "train_e2e", "train_local", "distributed", "kl_dispatch", "topk_occupancy")
BENCH_FILES = ("bench_topk_encoder", "bench_relu_encoder", "bench_sparse_decoder", "bench_relu_autoencoder",
               "bench_linear_kl", "bench_e2e_step", "bench_matryoshka")
# The model the training parts run: GPT-2 small's shape (smoke: a tiny one, same vocabulary).
TRAIN_SHAPE = dict(n_layer=12, d_model=768, n_head=12, d_vocab=50_257)
SMOKE_TRAIN_SHAPE = dict(n_layer=2, d_model=64, n_head=4, d_vocab=50_257)
ROW_KEYS = ("op", "shape", "variant", "passes", "dtype", "interpreted", "median_s", "p20_s", "p80_s", "TFLOPs",
            "GBps", "peak_fraction", "peak_limit", "peak_memory_bytes")


def run_part(command: list[str], budget: float) -> tuple[dict, str]:
    """Run command in its own process group, killed (the group) after budget seconds.

    Returns (the part's record, with the output's tail; the whole output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timed out"
    return {"status": status, "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "command": " ".join(command), "output_tail": output[-3000:]}, output


def gpu_tests(args, budget) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE"]
    if args.smoke:  # the plumbing only: one file's gpu tests (skipped without CUDA)
        command.append("tests/test_topk_encoder.py")
    result, _ = run_part(command, budget)
    lines = [line for line in result["output_tail"].splitlines() if line.strip()]
    result["summary"] = lines[-1] if lines else ""
    result["failures"] = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    if result["returncode"] == 5:  # pytest: no test selected (none marked gpu there)
        result["status"] = "ok"
    return result


def bench_file(stem: str, args, budget) -> dict:
    out = Path(tempfile.mkdtemp(prefix="fastsae-gpu-check-")) / f"{stem}.json"
    command = [sys.executable, "-m", "pytest", "--benchmark", f"benchmarks/{stem}.py", "-q", "-p", "no:cacheprovider",
               "--bench-out", str(out)]
    if args.smoke:  # every row once, untimed, the Triton kernels under the interpreter on CPU
        command += ["--bench-size", "small", "--benchmark-disable", "--bench-interpreter"]
    else:
        command += ["--bench-size", "full", "--benchmark-max-time=0.25"]
    result, _ = run_part(command, budget)
    if out.is_file():
        rows = json.loads(out.read_text())["rows"]
        result["rows"] = [{key: row.get(key) for key in ROW_KEYS} for row in rows]
    if result["status"] == "ok" and not result.get("rows") and not args.smoke:
        result.update(status="failed", error="pytest passed but wrote no rows")
    return result


def worker_part(worker: str, args, budget, *extra: str) -> dict:
    """Run this file as ``--worker <worker>`` in its own process: it stops 10 s before the budget
    and prints its result as its last JSON line, merged into the part's record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker,
               "--deadline", str(time.time() + budget - 10), *extra]
    if args.smoke:
        command.append("--smoke")
    result, output = run_part(command, budget)
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            result.update(json.loads(line))
            if result["status"] == "ok":
                del result["output_tail"]  # it holds the same JSON
            break
    else:
        if result["status"] == "ok":
            result.update(status="failed", error="the worker printed no result")
    return result


def train(kind: str, args, budget) -> dict:
    return worker_part("train", args, budget, "--kind", kind, "--steps", str(3 if args.smoke else args.steps))


def distributed(args, budget) -> dict:
    """`torchrun --nproc-per-node 2 -m fastsae train` (data parallel, NCCL) against one process with
    the same global batch: both exit cleanly and their held-out KL agree. Needs 2 GPUs; --smoke runs
    it on CPU with gloo. A few steps of the gpt2-e2e preset on the training parts' random-weight
    model (smoke: the tiny one) and random tokens."""
    import numpy as np
    import torch
    from bench_e2e_step import model_dir

    n_gpus = torch.cuda.device_count()
    if not args.smoke and n_gpus < 2:
        return {"status": "skipped", "gpus": n_gpus,
                "note": "fewer than 2 GPUs: 2-process data parallel untested on NCCL"}
    shape = SMOKE_TRAIN_SHAPE if args.smoke else TRAIN_SHAPE
    batch, ctx, steps = (4, 32, 4) if args.smoke else (16, 1024, 10)
    work = Path(tempfile.mkdtemp(prefix="fastsae-gpu-check-dp-"))
    tokens = work / "tokens.npy"
    rng = np.random.default_rng(0)
    np.save(tokens, rng.integers(0, shape["d_vocab"], size=batch * ctx * (steps + 4), dtype=np.int64))
    overrides = [f"model.name={model_dir(dict(shape, ctx=max(ctx, 128)))}", "data.source=tokens", "data.name=null",
                 "data.split=null", "data.eval_examples=null", "data.streaming=null", f"data.path={tokens}", "data.eval_fraction=0.2", f"data.context_length={ctx}",
                 f"optim.batch_size={batch}", f"optim.n_tokens={batch * ctx * steps}",
                 f"saes.hooks=[blocks.{shape['n_layer'] // 2}.hook_resid_pre]", f"eval.n_tokens={batch * ctx}",
                 f"eval.batch_size={batch // 2}", "log.progress=false", "checkpoint.every_minutes=0",
                 f"device={'cpu' if args.smoke else 'cuda'}"]
    if args.smoke:
        overrides += ["saes.n_latents=256"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    runs = {}
    for name, launcher in (("two_ranks", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc-per-node", "2", "-m", "fastsae"]),
                           ("one_process", [sys.executable, "-m", "fastsae"])):
        run_dir = work / name
        result, _ = run_part(launcher + ["train", "gpt2-e2e", "--run-dir", str(run_dir), *sets], budget / 2)
        eval_file = run_dir / "eval.json"
        if eval_file.is_file():
            result["eval_kl"] = json.loads(eval_file.read_text())["metrics"]["kl"]
        runs[name] = result
    record = {"gpus": n_gpus, "backend": "gloo" if args.smoke else "nccl", "steps": steps, "batch": [batch, ctx],
              "model": shape, "seconds": round(sum(run["seconds"] for run in runs.values()), 1), "runs": runs}
    if any(run["status"] != "ok" or "eval_kl" not in run for run in runs.values()):
        return {"status": "failed", **record}
    a, b = runs["two_ranks"]["eval_kl"], runs["one_process"]["eval_kl"]
    record["kl_relative_difference"] = abs(a - b) / max(abs(b), 1e-12)
    # the ranks average gradients in another order than one process sums them (and TF32 on a GPU)
    record["status"] = "ok" if record["kl_relative_difference"] < 1e-2 else "failed"
    return record


def kl_dispatch(args, budget) -> dict:
    """The KL variants' timings (worker `--worker kl_dispatch`, its own process and budget)."""
    record = [] if args.smoke or not args.dispatch_record else ["--dispatch-record", str(args.dispatch_record)]
    return worker_part("kl_dispatch", args, budget, *record)


def topk_occupancy_worker(smoke: bool, deadline: float) -> dict:
    """The TopK forward at k = 32 with its config of two programs per SM (64 x 128 on one
    warpgroup: one program's selection overlaps the other's MMAs) against the 128 x 128 tile on 8
    warps it replaced (one program per SM, 2/3 of the L2 -> SM traffic), median seconds per call,
    bf16 and fp32 under TF32 at the GPT-2 preset. The compile facts say both fit without spills;
    this says which is faster (kernels/topk_encoder.py FWD_CONFIGS)."""
    import torch
    from harness import DEVICE, GPT2_PRESET, device_name, synchronize

    from fastsae.kernels import topk_encoder as tk

    n_tokens, d, n, k = (64, 32, 512, 32) if smoke else (GPT2_PRESET[key] for key in ("N", "d", "n", "k"))
    configs = {"two_per_sm": tk.FWD_CONFIGS[32], "one_per_sm": (128, 128, 64, 32, 8, 1)}
    dtypes = [("fp32", torch.float32)] if smoke else [("bf16", torch.bfloat16), ("fp32", torch.float32)]
    repeats = 1 if smoke else 5
    previous_precision, previous_config = torch.get_float32_matmul_precision(), tk.FWD_CONFIGS[32]
    torch.set_float32_matmul_precision("high")  # the trainer's CUDA setting: fp32 runs on TF32
    measurements, status = [], "ok"
    try:
        for name, dtype in dtypes:
            gen = torch.Generator(device=DEVICE).manual_seed(0)
            x = torch.randn(n_tokens, d, generator=gen, device=DEVICE).to(dtype)
            W_enc = torch.randn(n, d, generator=gen, device=DEVICE).to(dtype).t()  # E2ESAE's latent-major layout
            b_enc = torch.randn(n, generator=gen, device=DEVICE).to(dtype)
            seconds = {}
            for label, config in configs.items():
                if time.time() > deadline:
                    status = "out of time"
                    break
                tk.FWD_CONFIGS[32] = config
                tk.topk_encode_forward(x, W_enc, b_enc, k)  # compile / warm up
                synchronize()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    tk.topk_encode_forward(x, W_enc, b_enc, k)
                    synchronize()
                    times.append(time.perf_counter() - start)
                seconds[label] = statistics.median(times)
            if seconds:
                measurements.append(dict(dtype=name, N=n_tokens, d=d, n=n, k=k, seconds=seconds,
                                         fastest=min(seconds, key=seconds.get)))
    finally:
        tk.FWD_CONFIGS[32] = previous_config
        torch.set_float32_matmul_precision(previous_precision)
    return {"status": status, "device": device_name(), "measurements": measurements}


def kl_dispatch_worker(smoke: bool, deadline: float, record_path: Path | None) -> dict:
    """Median seconds per call of each fused_linear_kl variant per shape class (fastsae.ops.linear_kl:
    shape_class, VARIANTS_*), the fastest recorded with fastsae.ops._backend.record_measurement
    where record_path is given. --smoke: one tiny shape, the kernels under the interpreter on CPU,
    nothing recorded. Stops (status "out of time") when the clock passes deadline."""
    import torch
    from harness import DEVICE, GPT2_PRESET, LARGE, device_name, synchronize, versions

    from fastsae import ops
    from fastsae.kernels.linear_kl import linear_kl_triton
    from fastsae.ops._backend import record_measurement
    from fastsae.ops.linear_kl import VARIANTS_LOSS_ONLY, VARIANTS_WITH_GRAD, shape_class

    shapes = [(64, 32, 500)] if smoke else [tuple(s[key] for key in "NdV") for s in (GPT2_PRESET, LARGE)]
    # smoke: fp32 (the interpreter's bf16 dot is wrong: times only, but no garbage either)
    dtypes = [("fp32", torch.float32)] if smoke else [("bf16", torch.bfloat16), ("fp32", torch.float32)]
    repeats = 1 if smoke else 3
    measurements, status = [], "ok"
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # the trainer's CUDA setting: fp32 runs on TF32
    try:
        for n, d, v in shapes:
            for name, dtype in dtypes:
                gen = torch.Generator(device=DEVICE).manual_seed(0)
                h_orig = torch.randn(n, d, generator=gen, device=DEVICE)
                h_sae = (h_orig + 0.1 * torch.randn(n, d, generator=gen, device=DEVICE)).to(dtype)
                W_U = (torch.randn(d, v, generator=gen, device=DEVICE) / d ** 0.5 * 3).to(dtype)
                b_U = torch.randn(v, generator=gen, device=DEVICE).to(dtype)
                h_orig = h_orig.to(dtype)
                for with_grad in (True, False):
                    seconds = {}
                    for variant in VARIANTS_WITH_GRAD if with_grad else VARIANTS_LOSS_ONLY:
                        if time.time() > deadline:
                            status = "out of time"
                            break

                        def step(variant=variant):
                            h = h_sae.detach().requires_grad_(with_grad)
                            with torch.set_grad_enabled(with_grad):
                                if variant == "reference":
                                    loss = ops.fused_linear_kl(h, h_orig, W_U, b_U, backend="torch")
                                else:
                                    loss = linear_kl_triton(h, h_orig, W_U, b_U, one_sweep=variant != "two_pass")[0]
                                if with_grad:
                                    torch.autograd.grad(loss, h)
                            synchronize()

                        step()  # compile / warm up
                        times = []
                        for _ in range(repeats):
                            start = time.perf_counter()
                            step()
                            times.append(time.perf_counter() - start)
                        seconds[variant] = statistics.median(times)
                    if len(seconds) < (3 if with_grad else 2):
                        break
                    key = shape_class(dtype, d, v, with_grad)
                    entry = dict(shape_class=key, N=n, seconds=seconds, fastest=min(seconds, key=seconds.get))
                    if record_path is not None:
                        record_measurement("fused_linear_kl", device_name(), key, n, seconds, path=record_path,
                                           date=time.strftime("%Y-%m-%d"), triton=versions().get("triton"))
                    measurements.append(entry)
    finally:
        torch.set_float32_matmul_precision(previous)
    return {"status": status, "device": device_name(), "measurements": measurements,
            "record": str(record_path) if record_path is not None else None}


# ---------------------------------------------------------------------------- the training worker

def train_worker(kind: str, steps: int, smoke: bool, deadline: float) -> dict:
    """steps Trainer steps of the gpt2-<kind> preset on a random-weight GPT-2 and random tokens,
    fewer if the clock passes deadline (time.time()) first."""
    import torch
    from bench_e2e_step import model_dir
    from harness import DEVICE, device_peaks, train_step_cost

    from fastsae.model.lm import LanguageModel
    from fastsae.train import Trainer, load_config

    shape = SMOKE_TRAIN_SHAPE if smoke else TRAIN_SHAPE
    path = model_dir(dict(shape, ctx=1024))  # GPT-2's 1,024 positions
    layer = shape["n_layer"] // 2 if smoke else 6
    overrides = [f"model.name={path}", f"device={DEVICE}", "log.progress=false",
                 f"saes.hooks=[blocks.{layer}.hook_resid_pre]"]
    if smoke:
        overrides += ["saes.n_latents=256", "optim.batch_size=2", "data.context_length=32"]
    config = load_config(f"gpt2-{kind}", overrides)
    batch, ctx = config.optim.batch_size, config.data.context_length
    lm = LanguageModel.load(str(path), device=DEVICE)
    trainer = Trainer(config, model=lm, dataset=[])
    n_latents = next(iter(trainer.saes.values())).n_latents
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    batches = torch.randint(0, shape["d_vocab"], (steps, batch, ctx), device=DEVICE, generator=generator)

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, metrics = [], {}
    for tokens in batches:
        if times and time.time() > deadline:
            break
        start = time.perf_counter()
        metrics = trainer.step(tokens)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[min(5, len(times) - 1):]  # the first steps compile kernels and fill Adam's state
    median = statistics.median(steady)
    flops = train_step_cost(kind, shape["n_layer"], shape["d_model"], shape["d_vocab"], ctx, layer, n_latents, batch)
    result = {"status": "ok" if len(times) == steps else "out of time", "steps": len(times), "model": shape,
              "layer": layer, "n_latents": n_latents, "batch": [batch, ctx], "first_step_s": times[0],
              "median_step_s": median,
              "p20_step_s": statistics.quantiles(steady, n=5)[0] if len(steady) > 1 else median,
              "p80_step_s": statistics.quantiles(steady, n=5)[-1] if len(steady) > 1 else median,
              "tokens_per_s": batch * ctx / median, "flops_per_step": flops, "TFLOPs": flops / median / 1e12,
              "last_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    peaks = device_peaks()
    if peaks is not None:  # the step's work against bf16 tensor-core peak (issue 12's target: 40 %)
        result["fraction_of_bf16_peak"] = result["TFLOPs"] / peaks["bf16"]
    if DEVICE == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


# ---------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs anywhere (CPU too)")
    parser.add_argument("--out", type=Path, help="the JSON to write (default: benchmarks/results/"
                        "gpu_check_<device>.json; with --smoke benchmarks/out/gpu_check_smoke_<device>.json)")
    parser.add_argument("--parts", help="comma-separated subset of: " + ", ".join(
        PARTS))
    parser.add_argument("--steps", type=int, default=50, help="training steps per training part (default 50)")
    parser.add_argument("--dispatch-record", type=Path, default=ROOT / "fastsae" / "ops" / "measured_dispatch.json",
                        help="the measured-dispatch record kl_dispatch updates for this GPU (default: the one "
                        "fastsae ships, fastsae/ops/measured_dispatch.json; never written with --smoke)")
    parser.add_argument("--worker", choices=["train", "kl_dispatch", "topk_occupancy"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["e2e", "local"], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "train":
        print(json.dumps(train_worker(args.kind, args.steps, args.smoke, args.deadline), default=str))
        return 0
    if args.worker == "kl_dispatch":
        record = None if args.smoke else args.dispatch_record
        print(json.dumps(kl_dispatch_worker(args.smoke, args.deadline, record), default=str))
        return 0
    if args.worker == "topk_occupancy":
        print(json.dumps(topk_occupancy_worker(args.smoke, args.deadline), default=str))
        return 0

    import torch
    from harness import HAS_CUDA, device_name, device_peaks, device_slug, versions

    if not HAS_CUDA and not args.smoke:
        parser.error("no CUDA device: the full check needs a GPU (use --smoke to check the script on CPU)")
    known = set(PARTS)
    wanted = set(args.parts.split(",")) if args.parts else known
    if wanted - known:
        parser.error(f"--parts: unknown {', '.join(sorted(wanted - known))}; "
                     f"expected some of {', '.join(sorted(known))}")
    out = args.out or (HERE / "out" / f"gpu_check_smoke_{device_slug()}.json" if args.smoke
                       else HERE / "results" / f"gpu_check_{device_slug(device_name())}.json")

    parts = []
    if "gpu_tests" in wanted:
        parts.append(("gpu_tests", lambda budget: gpu_tests(args, budget)))
    if "bench" in wanted:
        parts += [(stem, lambda budget, stem=stem: bench_file(stem, args, budget)) for stem in BENCH_FILES]
    parts += [(f"train_{kind}", lambda budget, kind=kind: train(kind, args, budget))
              for kind in ("e2e", "local") if f"train_{kind}" in wanted]
    if "distributed" in wanted:
        parts.append(("distributed", lambda budget: distributed(args, budget)))
    if "kl_dispatch" in wanted:
        parts.append(("kl_dispatch", lambda budget: kl_dispatch(args, budget)))
    if "topk_occupancy" in wanted:
        parts.append(("topk_occupancy", lambda budget: worker_part("topk_occupancy", args, budget)))

    report = {"device": device_name(), "device_peaks": device_peaks(), "gpus": torch.cuda.device_count(),
              "smoke": args.smoke, "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "budgets_s": BUDGETS, "parts": {}}
    start = time.perf_counter()
    for name, part in parts:
        budget = 600 if args.smoke else BUDGETS[name]  # smoke: a shared CPU, times mean nothing
        print(f"[gpu_check] {name} (budget {budget} s) ...", flush=True)
        try:
            result = part(budget)
        except Exception:  # a broken part is recorded; the rest still run
            result = {"status": "error", "error": traceback.format_exc()[-3000:]}
        report["parts"][name] = result
        print(f"[gpu_check] {name}: {result['status']} ({result.get('seconds', '-')} s)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)  # written after every part: a kill keeps the rest
        report["total_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(report, indent=2, default=str))
    print(f"[gpu_check] wrote {out} ({report['total_s']} s)")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
