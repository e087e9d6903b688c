"""relu_autoencode: a ReLU SAE from input to reconstruction, fused, vs the path it replaces and the naive form.

    fused          fastsae.ops.relu_autoencode(backend="triton"): the encoder GEMM with a compacting
                   epilogue, a gather decoder, the code's gradient at the active entries only
                   (kernels/relu_autoencoder.py); dense rows by latent chunks, recomputed in backward
    reference      the same op's chunked PyTorch reference (the CPU path)
    encode_decode  relu_encode + dense_decode + the Lp norm of the dense code: the trainer's path
                   before this op (an [N, n] code, and a dense grad_code = grad_out @ W_dec^T)
    naive          x @ W_enc + b_enc, relu, @ W_dec + b_dec in plain torch (every [N, n] tensor)

Loss for fwd_bwd: MSE(reconstruction, target) + lp_sum.mean() / d_in (p = 1), backward; the target
is x for an SAE, a fixed [N, d_out] activation for a transcoder (shapes with a fourth size, d_out:
GPT-2's MLP input 768 to its hidden 3,072 on a GPU). Codes: "dense" (b_enc = 0: about half the
latents active, as at initialisation) and "sparse" (b_enc = -3: ~0.1 % active, the L0 of a trained
SAE). Cost model: harness.relu_autoencoder_cost, with the code's measured L0: 2*N*d_in*n +
2*N*L0*d_out forward, + 4*N*L0*(d_in + d_out) backward.

CPU peak memory of a training step, each variant in a fresh process (the issue's measurement):

    python benchmarks/bench_relu_autoencoder.py --memory [--n 262144 --d 256 --tokens 1024 --threads 2]

compares relu_autoencode, relu_encode + dense_decode and a TopK SAE (topk_encode + sparse_decode,
k = 32) of the same size: forward + backward of MSE + Lp, the gradients allocated in the step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch
from harness import (DEVICE, DTYPE, GPT2_PRESET, HAS_CUDA, LARGE, bench_size, device_name, measure,
                     peak_memory_bytes, relu_autoencoder_cost, variants, versions)

from fastsae import ops

# (N, d_in, n_latents) for an SAE, (N, d_in, n_latents, d_out) for a transcoder (d_out != d_in).
SHAPES = {
    "full": [tuple(s[key] for key in "Ndn") for s in (GPT2_PRESET, LARGE)] + [(16 * 1024, 768, 46_080, 3072)]
    if HAS_CUDA else [(1024, 256, 46_080), (1024, 256, 46_080, 1024)],
    "small": [(32, 64, 384), (32, 64, 384, 160)],  # tiny: the interpreter (--bench-interpreter) gets through
}
CODES = {"dense": 0.0, "sparse": -3.0}
TRITON_VARIANTS = ("fused",)
VARIANTS = variants(TRITON_VARIANTS + ("reference", "encode_decode", "naive"), triton_variants=TRITON_VARIANTS)
PASSES = ("fwd", "fwd_bwd")


def shape_sizes(shape) -> tuple[int, int, int, int]:
    """(N, d_in, n_latents, d_out) of a SHAPES entry (d_out = d_in for an SAE's three sizes)."""
    n_tokens, d_in, n_latents, *rest = shape
    return n_tokens, d_in, n_latents, rest[0] if rest else d_in


def shape_id(shape) -> str:
    n_tokens, d_in, n_latents, d_out = shape_sizes(shape)
    return f"N{n_tokens}-d{d_in}-n{n_latents}" + (f"-d_out{d_out}" if d_out != d_in else "")


def make_inputs(shape, code, dtype=DTYPE, device=DEVICE, requires_grad=True):
    """x [N, d_in], W_enc (latent-major, as E2ESAE stores it), b_enc, W_dec [n, d_out] (unit rows), b_dec."""
    n_tokens, d, n_latents, d_out = shape_sizes(shape)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_tokens, d, device=device, generator=g).to(dtype)
    W_enc = (torch.randn(n_latents, d, device=device, generator=g) / d**0.5).to(dtype).t()
    b_enc = torch.full((n_latents,), CODES[code], device=device, dtype=dtype)
    W_dec = torch.randn(n_latents, d_out, device=device, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(dtype)
    b_dec = torch.zeros(d_out, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, W_enc, b_enc, W_dec, b_dec)]


def _old_path(x, W_enc, b_enc, W_dec, b_dec):
    code = ops.relu_encode(x, W_enc, b_enc)
    return ops.dense_decode(code, W_dec, b_dec), torch.linalg.vector_norm(code.float(), ord=1, dim=-1)


def _naive(x, W_enc, b_enc, W_dec, b_dec):
    code = torch.relu(x @ W_enc + b_enc)
    return code @ W_dec + b_dec, code.float().abs().sum(-1)


FORWARDS = {
    "fused": lambda *a: ops.relu_autoencode(*a, backend="triton")[:2],
    "reference": lambda *a: ops.relu_autoencode(*a, backend="torch")[:2],
    "encode_decode": _old_path,
    "naive": _naive,
}


def make_step(shape, code, variant, passes):
    leaves = make_inputs(shape, code, requires_grad=passes == "fwd_bwd")
    forward = FORWARDS[variant]
    n_tokens, d, _, d_out = shape_sizes(shape)
    # An SAE reconstructs x; a transcoder predicts another activation (here a fixed one)
    device = leaves[0].device
    target = None if d_out == d else torch.randn(n_tokens, d_out, device=device,
                                                 generator=torch.Generator(device=device).manual_seed(1))

    def step():
        if passes == "fwd":
            with torch.no_grad():
                return forward(*leaves)
        for leaf in leaves:
            leaf.grad = None
        reconstruction, lp_sum = forward(*leaves)
        loss = (torch.nn.functional.mse_loss(reconstruction.float(), leaves[0].float() if target is None else target)
                + lp_sum.mean() / d)
        loss.backward()

    return step


def measured_l0(shape, code) -> float:
    with torch.no_grad():
        return float(ops.relu_autoencode(*make_inputs(shape, code, requires_grad=False)).l0.mean())


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=shape_id)
def test_relu_autoencode(benchmark, shape, code, variant, passes):
    n_tokens, d, n_latents, d_out = shape_sizes(shape)
    step = make_step(shape, code, variant, passes)
    step()  # compile (GPU) / warm up before timing
    l0 = measured_l0(shape, code)
    flops, bytes_ = relu_autoencoder_cost(n_tokens, d, n_latents, l0, DTYPE.itemsize, passes, d_out=d_out)
    widths = f"d={d}" if d_out == d else f"d_in={d} d_out={d_out}"
    measure(benchmark, step, op="relu_autoencode",
            shape=f"N={n_tokens} {widths} n={n_latents} {code} code (L0 {l0:.0f})",
            variant=variant, passes=passes, dtype=DTYPE, flops=flops, bytes_=bytes_,
            triton=variant in TRITON_VARIANTS, N=n_tokens, d=d, n_latents=n_latents, d_out=d_out, code=code, l0=l0)


# ---------------------------------------------------------------------------------------------
# A training step's peak memory on CPU, one fresh process per variant (see the module docstring)

MEMORY_VARIANTS = ("relu_autoencode", "relu_encode+dense_decode", "topk_encode+sparse_decode")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def memory_child(variant: str, code: str, n_tokens: int, d: int, n_latents: int, k: int) -> dict:
    """One training step's forward + backward in this process, after a warm-up step: its peak RSS
    above the weights, the whole process's peak RSS, and its time (one step: a CPU-heavy run)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    leaves = make_inputs((n_tokens, d, n_latents), code, dtype=torch.float32, device="cpu")
    x = leaves[0]

    def forward():
        if variant == "relu_autoencode":
            return ops.relu_autoencode(*leaves, backend="torch")[:2]
        if variant == "relu_encode+dense_decode":
            return _old_path(*leaves)
        values, indices = ops.topk_encode(x, leaves[1], leaves[2], k, backend="torch")
        return ops.sparse_decode(values, indices, leaves[3], leaves[4], backend="torch"), values.float().sum(-1)

    def step():
        for leaf in leaves:
            leaf.grad = None
        reconstruction, lp_sum = forward()
        (torch.nn.functional.mse_loss(reconstruction, x) + lp_sum.mean() / d).backward()

    step()  # warm-up: lazy initialisations (the gradients are freed again below)
    for leaf in leaves:
        leaf.grad = None
    start = time.perf_counter()
    peak_above_weights = peak_memory_bytes(step)  # the step's gradients are allocated inside it
    seconds = time.perf_counter() - start
    total_peak = _status_bytes("VmHWM")
    with torch.no_grad():
        l0 = float(ops.relu_autoencode(*[t.detach() for t in leaves], backend="torch").l0.mean())
    return dict(variant=variant, code=code, N=n_tokens, d=d, n_latents=n_latents, k=k,
                l0=l0 if variant != "topk_encode+sparse_decode" else k,
                step_peak_bytes=peak_above_weights, process_peak_rss_bytes=total_peak,
                weights_bytes=2 * d * n_latents * 4, step_s=seconds)


def memory_report(n_tokens: int, d: int, n_latents: int, k: int, threads: int) -> list[dict]:
    rows = []
    for code in CODES:
        for variant in MEMORY_VARIANTS:
            if variant.startswith("topk") and code == "sparse":
                continue  # a TopK code has k latents whatever the bias
            out = subprocess.run([sys.executable, __file__, "--memory-child", variant, code, str(n_tokens), str(d),
                                  str(n_latents), str(k)], capture_output=True, text=True, check=True,
                                 env=dict(os.environ, FASTSAE_BACKEND="torch", OMP_NUM_THREADS=str(threads)))
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true", help="the CPU training-step memory comparison")
    parser.add_argument("--memory-child", nargs=6, metavar=("VARIANT", "CODE", "N", "D", "N_LATENTS", "K"))
    parser.add_argument("--tokens", type=int, default=8 * 128)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--n", type=int, default=262_144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
                        help="torch threads in each step's process (default: OMP_NUM_THREADS, else every core)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.memory_child:
        variant, code, *sizes = args.memory_child
        print(json.dumps(memory_child(variant, code, *map(int, sizes))))
        return
    if not args.memory:
        parser.error("use pytest for the timing benchmarks; --memory for the CPU memory comparison")
    rows = memory_report(args.tokens, args.d, args.n, args.k, args.threads)
    gib = 2**30
    print(f"{'variant':<27} {'code':<7} {'L0':>8} {'step peak':>10} {'process':>9} {'step s':>7}")
    for r in rows:
        print(f"{r['variant']:<27} {r['code']:<7} {r['l0']:>8.1f} {r['step_peak_bytes'] / gib:>8.2f}G "
              f"{r['process_peak_rss_bytes'] / gib:>8.2f}G {r['step_s']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           load_average_1min=os.getloadavg()[0], threads=args.threads,
                           command=shlex.join(["python", "benchmarks/bench_relu_autoencoder.py",
                                               *(argv if argv is not None else sys.argv[1:])]), rows=rows), f,
                      indent=2)


if __name__ == "__main__":
    main()
