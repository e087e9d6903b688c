"""What every benchmark shares: device, shapes, cost model, timing, peak memory, the per-op report.

The bench_<op>.py files import it (`from harness import ...`; pytest puts benchmarks/ on sys.path),
and so does gpu_check.py. Run the suite with `pytest --benchmark` (see the root conftest.py).

- bench_size(): "full" on CUDA (the GPT-2 preset shape and a d=4096 shape), "small" on CPU;
  `--bench-size` / FASTSAE_BENCH_SIZE override. "full" on CPU runs the shapes the README quotes.
- variants(): the variants a file times here. On CPU the Triton kernels run under Triton's
  interpreter, whose timings say nothing about GPU speed: those rows are left out unless
  `--bench-interpreter` (FASTSAE_BENCH_INTERPRETER=1) brings them back, labelled as such.
- measure(benchmark, step, ...): times step with pytest-benchmark (synchronised on CUDA) and records
  in extra_info what the report and the JSON need: op, shape, variant, the cost model's FLOPs and
  bytes per call, p20/p50/p80, effective TFLOP/s and GB/s, the fraction of the device's roofline,
  peak memory.
- PEAKS / device_peaks(): datasheet peaks of the GPUs we expect (dense, no sparsity).
- report_lines(records): the compact per-op tables (100 columns) that benchmarks/conftest.py prints.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import re
import shlex
import textwrap
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of triton (fastsae.ops imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# bf16 is the training dtype on a GPU; on CPU the references run in fp32 (the interpreter's bf16
# tl.dot is wrong, so interpreted rows would be meaningless in bf16 anyway).
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
REPORT_WIDTH = 100

# The shapes that matter: GPT-2 small layer 6 as the presets train it, and a Llama-3-8B-like one.
GPT2_PRESET = dict(N=16 * 1024, d=768, n=46_080, k=32, V=50_257)
LARGE = dict(N=16 * 1024, d=4096, n=131_072, k=32, V=128_256)


def bench_size() -> str:
    size = os.environ.get("FASTSAE_BENCH_SIZE") or ("full" if HAS_CUDA else "small")
    if size not in ("small", "full"):
        raise ValueError(f"FASTSAE_BENCH_SIZE / --bench-size must be 'small' or 'full', got {size!r}")
    return size


def include_interpreted() -> bool:
    """Whether Triton-kernel rows are timed on CPU, under the interpreter (off by default)."""
    return os.environ.get("FASTSAE_BENCH_INTERPRETER", "") not in ("", "0")


def variants(all_variants, triton_variants) -> list[str]:
    """all_variants minus the Triton ones when they would run under the interpreter, unasked."""
    if HAS_CUDA or include_interpreted():
        return list(all_variants)
    return [v for v in all_variants if v not in triton_variants]


# ---------------------------------------------------------------------------- device and versions

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


def device_slug(name: str | None = None) -> str:
    name = name or (("cuda " if HAS_CUDA else "") + device_name())
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def versions() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    for module in ("triton", "transformer_lens", "transformers", "pytest_benchmark"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    if HAS_CUDA:
        info["cuda"] = torch.version.cuda
    return info



def script_record(script: str, args: list[str], **fields) -> dict:
    """A results record of one of the benchmarks/ scripts: the device, versions, date, load and the
    command that made it (``script`` with ``args``), then ``fields``."""
    return dict(device=device_name(), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                load_average_1min=os.getloadavg()[0], cpu_count=os.cpu_count(),
                command=shlex.join(["python", script, *args]), **fields)


def write_record(path: str | os.PathLike | None, record: dict) -> None:
    """Write a results record as indented JSON (nothing where ``path`` is None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1) + "\n")

# Datasheet peaks, dense (no 2:4 sparsity): TFLOP/s for bf16 (= fp16) and TF32 tensor cores and
# fp32 CUDA cores, and HBM GB/s. Matched in order against torch.cuda.get_device_name(); other
# devices are reported as unknown (no fraction of peak).
PEAKS = [
    ("H200 NVL", dict(model="H200 NVL", bf16=835.0, tf32=417.5, fp32=60.0, hbm_GBps=4800)),
    ("H200", dict(model="H200 SXM", bf16=989.4, tf32=494.7, fp32=66.9, hbm_GBps=4800)),
    ("H100 NVL", dict(model="H100 NVL", bf16=835.0, tf32=417.5, fp32=60.0, hbm_GBps=3900)),
    ("H100 PCIe", dict(model="H100 PCIe", bf16=756.0, tf32=378.0, fp32=51.2, hbm_GBps=2000)),
    ("H100", dict(model="H100 SXM", bf16=989.4, tf32=494.7, fp32=66.9, hbm_GBps=3350)),
    ("A100 80GB PCIe", dict(model="A100 80GB PCIe", bf16=312.0, tf32=156.0, fp32=19.5, hbm_GBps=1935)),
    ("A100-SXM4-80GB", dict(model="A100 SXM 80GB", bf16=312.0, tf32=156.0, fp32=19.5, hbm_GBps=2039)),
    ("A100", dict(model="A100 40GB", bf16=312.0, tf32=156.0, fp32=19.5, hbm_GBps=1555)),
]


def device_peaks(name: str | None = None) -> dict | None:
    """The PEAKS entry for a GPU name (default: this process's GPU); None for CPUs and unknown GPUs."""
    if name is None:
        if not HAS_CUDA:
            return None
        name = torch.cuda.get_device_name()
    # a key matches at the start of a word: "H200" is not GH200 (a different memory system)
    return next((dict(peaks) for key, peaks in PEAKS if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}", name)),
                None)


def compute_peak(peaks: dict, dtype: str) -> tuple[float, str]:
    """(TFLOP/s, which unit) a matmul in dtype can reach: fp32 counts TF32 where torch allows it."""
    if "bfloat16" in dtype or "float16" in dtype:
        return peaks["bf16"], "bf16"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return peaks["tf32"], "tf32"
    return peaks["fp32"], "fp32"


# ---------------------------------------------------------------------------- cost model
# GUIDE section 5. N tokens, d model width, n latents, k active, V vocabulary, s bytes per element
# (indices are int64). FLOPs count the work the op must do (a multiply-add is 2), not what a given
# implementation does, so every variant of an op is measured against the same numerator. Bytes are
# the compulsory traffic: each input read once, each output written once.

def topk_encoder_cost(N, d, n, k, s, passes):
    flops = 2 * N * d * n                                   # x @ W_enc, unavoidable
    bytes_ = N * d * s + d * n * s + n * s + N * k * (s + 8)  # x, W_enc, b_enc; values + indices
    if passes == "fwd_bwd":
        flops += 4 * N * k * d                              # grad_x and grad_W_enc: sparse, k per token
        bytes_ += (N * k * s + N * k * d * s                # grad_values; the W_enc rows they touch
                   + N * d * s + d * n * s + n * s + N * d * s)  # x again; grad_W_enc, grad_b, grad_x
    return flops, bytes_


def relu_encoder_cost(N, d, n, s, passes):
    flops = 2 * N * d * n
    bytes_ = N * d * s + d * n * s + n * s + N * n * s      # x, W_enc, b_enc; the dense code
    if passes == "fwd_bwd":
        flops += 4 * N * d * n                              # grad_x and grad_W_enc as dense GEMMs
        bytes_ += 2 * N * n * s + N * d * s + d * n * s + d * n * s + N * d * s  # grad, mask; x, W; grads
    return flops, bytes_


def relu_autoencoder_cost(N, d, n, l0, s, passes, *, d_out=None):
    """A ReLU SAE from x to its reconstruction (fastsae.ops.relu_autoencode), l0 the code's mean L0;
    d = d_in, the encoder's width, and d_out the decoder's (a transcoder's; d by default).

    What it must do: the encoder GEMM, 2*N*d_in*n, and every other product over the active entries
    only: decode 2*N*L0*d_out; backward the code's gradient at the active entries (sampled dots)
    and grad_W_dec, 2*N*L0*d_out each, grad_x and grad_W_enc, 2*N*L0*d_in each. A dense grad_code
    = grad_out @ W_dec^T (the path this op replaces) is another 2*N*d_out*n. Bytes: x, W_enc,
    b_enc, the W_dec rows the code touches, the compact code (value + int32 id per entry), the
    reconstruction; backward reads x, W_enc, grad_out and those W_dec rows again and writes the
    four gradients.
    """
    d_in, d_out = d, d if d_out is None else d_out
    entries = N * l0
    touched = min(n, entries) * d_out * s
    flops = 2 * N * d_in * n + 2 * entries * d_out
    bytes_ = N * d_in * s + d_in * n * s + n * s + touched + entries * (s + 4) + N * d_out * s
    if passes == "fwd_bwd":
        flops += 4 * entries * d_out + 4 * entries * d_in
        bytes_ += (N * d_in * s + d_in * n * s + N * d_out * s + touched + entries * (s + 4)  # x, W_enc, grad_out, W_dec, code
                   + N * d_in * s + d_in * n * s + n * s  # grad_x, grad_W_enc, grad_b_enc
                   + n * d_out * s + d_out * s)  # grad_W_dec, grad_b_dec
    return int(flops), int(bytes_)


def sparse_decoder_cost(N, k, n, d, s, passes):
    flops = 2 * N * k * d
    bytes_ = N * k * (s + 8) + N * k * d * s + N * d * s    # code; gathered W_dec rows; x_hat
    if passes == "fwd_bwd":
        flops += 4 * N * k * d                              # grad_values and grad_W_dec
        bytes_ += (N * k * (s + 8) + N * k * d * s          # code again; grad_out rows per slot
                   + min(n, N * k) * d * s                  # W_dec rows touched (grad_values)
                   + n * d * s + N * d * s + N * k * s)     # grad_W_dec, grad_b_dec's read, grad_values
    return flops, bytes_


def batchtopk_cost(N, d, n, k, candidates, s, passes):
    """A BatchTopK SAE's training pass (fastsae.activations.batchtopk): the TopK encoder keeping
    `candidates` per token (its backward runs over all of them), the batch selection, and the
    sparse decoder over about k kept per token."""
    flops, bytes_ = topk_encoder_cost(N, d, n, candidates, s, passes)
    decode = sparse_decoder_cost(N, k, n, d, s, passes)
    return flops + decode[0], bytes_ + decode[1]


def linear_kl_cost(N, d, V, s, passes):
    # Forward: the clean and the SAE logits, 2*N*d*V each; the gradient wrt h_sae one more pass
    # (6*N*d*V at best, with the logits held per chunk; what each variant does: linear_kl_flops).
    flops = (4 if passes == "fwd" else 6) * N * d * V
    bytes_ = 2 * N * d * s + d * V * s + V * s              # h_orig, h_sae, W_U, b_U
    if passes == "fwd_bwd":
        bytes_ += d * V * s + N * d * s                     # W_U again, grad_h_sae
    return flops, bytes_


# N*d*V multiples each fused_linear_kl variant computes (bench_linear_kl's rows; GUIDE section 5):
# the fused one-sweep kernel forms both runs' logit tiles and then updates the gradient's two
# accumulators (G0, G1: kernels/linear_kl.py) with W_U^T, 8; the fused two-pass kernels recompute
# both logit tiles in backward, 4 + 6 = 10; the chunked reference and the naive form hold the
# logits of a chunk (all of them) and do one gradient product, 6. Loss only: 4 for all.
LINEAR_KL_FLOPS = {"fused": {"fwd": 4, "fwd_bwd": 8}, "fused_two_pass": {"fwd": 4, "fwd_bwd": 10},
                   "reference": {"fwd": 4, "fwd_bwd": 6}, "naive": {"fwd": 4, "fwd_bwd": 6}}


def linear_kl_flops(variant, N, d, V, passes):
    """FLOPs one call of a fused_linear_kl variant does (not the must-do count of linear_kl_cost)."""
    return LINEAR_KL_FLOPS[variant][passes] * N * d * V


def lm_forward_flops(n_layers, d, ctx):
    """Per token, a GPT-2 block's forward: 24*d^2 (QKV, output, 4d MLP) + 2*ctx*d (causal attention
    scores and weighted sum, averaged over positions)."""
    return n_layers * (24 * d * d + 2 * ctx * d)


def train_step_cost(kind, n_layer, d_model, d_vocab, ctx, layer, n_latents, batch):
    """FLOPs an SAE training step must do (issue 12's count), per step of batch x ctx tokens.

    e2e: the clean pass (no logits), the spliced pass from the SAE's block, the backward of those
    blocks for activations only (about one forward), the SAE (encoder forward + both backward
    GEMMs: 6*d*n; the sparse decoder is negligible), and the KL: 8*d*V per token, what the fused
    one-sweep kernel does on a GPU (linear_kl_flops; 6 at best, 10 before it).
    local: the clean pass up to the SAE's hook and the SAE.
    """
    tokens = batch * ctx
    sae = 6 * d_model * n_latents
    if kind == "local":
        return tokens * (lm_forward_flops(layer, d_model, ctx) + sae)
    after = n_layer - layer
    lm = lm_forward_flops(n_layer, d_model, ctx) + 2 * lm_forward_flops(after, d_model, ctx)
    return tokens * (lm + sae + LINEAR_KL_FLOPS["fused"]["fwd_bwd"] * d_model * d_vocab)


# ---------------------------------------------------------------------------- memory and timing

def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _cpu_memory_probe_ready(libc) -> bool:
    """Prepare this process to read one call's peak RSS growth (Linux). glibc keeps freed memory in
    its heap, where a later call would reuse it unseen: a fixed 128 KiB mmap threshold gives every
    large tensor its own mapping, returned to the OS when freed."""
    try:
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM restarts at the current RSS
            f.write("5")
        return True
    except (OSError, AttributeError):
        return False


def _cpu_memory_probe_done(libc) -> None:
    """Back to timing conditions: glibc's warmed-up state, where its dynamic threshold has risen to
    its 64-bit maximum (32 MiB mmap, twice that for trimming), so later rows are not timed with a
    fresh mapping (and its page faults) for every tensor."""
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)


def peak_memory_bytes(step) -> int | None:
    """Peak memory one call of step() adds to what is allocated before it.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): the growth of the process's peak RSS
    (VmHWM, reset just before the call) over its RSS, since torch's CPU allocations are invisible to
    tracemalloc. None where neither can be read (e.g. macOS).
    """
    gc.collect()
    if HAS_CUDA:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    libc = _libc()
    if libc is None or not _cpu_memory_probe_ready(libc):
        return None
    try:
        before = _status_bytes("VmRSS")
        step()
        return max(0, _status_bytes("VmHWM") - before)
    finally:
        _cpu_memory_probe_done(libc)


def cuda_timed(fn):
    """fn, followed by a device synchronize so the timer measures the GPU work."""

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        synchronize()
        return out

    return run


def percentile(sorted_data, q: float) -> float:
    """Linear-interpolated q-quantile (0..1) of sorted data."""
    pos = (len(sorted_data) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def measure(benchmark, step, *, op: str, shape: str, variant: str, passes: str, dtype, flops: int | None,
            bytes_: int | None, triton: bool, pedantic: dict | None = None, **info) -> float | None:
    """Time step() and record one report row in benchmark.extra_info.

    op, shape, passes: what the row's table is keyed on (one table per op, one block per shape and
    pass); variant: the row; flops, bytes_: the cost model's figures per call (None: not modelled);
    triton: whether step runs a Triton kernel (under the interpreter on CPU); pedantic:
    benchmark.pedantic's options for slow steps; info: more fields for the JSON (shapes, dtype).
    Returns the median in seconds, or None under --benchmark-disable (one call, no figures).
    """
    dtype = str(dtype).replace("torch.", "")
    benchmark.group = f"{op} {passes} {shape}"
    benchmark.extra_info.update(op=op, shape=shape, variant=variant, passes=passes, dtype=dtype, device=device_name(),
                                interpreted=triton and not HAS_CUDA, flops=flops, bytes=bytes_, **info)
    timed = cuda_timed(step)
    if pedantic is not None and not benchmark.disabled:
        benchmark.pedantic(timed, **pedantic)
    else:
        benchmark(timed)
    if benchmark.disabled:
        return None
    data = sorted(benchmark.stats.stats.data)
    median = percentile(data, 0.5)
    row = dict(median_s=median, p20_s=percentile(data, 0.2), p80_s=percentile(data, 0.8), rounds=len(data))
    if flops:
        row["TFLOPs"] = flops / median / 1e12
    if bytes_:
        row["GBps"] = bytes_ / median / 1e9
    peaks = device_peaks()
    if peaks is not None:  # roofline: the op is at 100 % when either resource is saturated
        tflops_peak, unit = compute_peak(peaks, dtype)
        fractions = {}
        if flops:
            fractions[f"{unit} TFLOP/s"] = row["TFLOPs"] / tflops_peak
        if bytes_:
            fractions["HBM GB/s"] = row["GBps"] / peaks["hbm_GBps"]
        if fractions:
            limit = max(fractions, key=fractions.get)
            row.update(peak_fraction=fractions[limit], peak_limit=limit)
    row["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark.extra_info.update(row)
    return median


# ---------------------------------------------------------------------------- the report

def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.1e}"


def report_lines(records: list[dict], peaks: dict | None, device: str, *, load_average: float | None = None,
                 cuda: bool | None = None) -> list[str]:
    """One table per op (records: the rows' extra_info), at most REPORT_WIDTH columns.

    Within an op, one block per (passes, shape), rows in the order they ran; `ratio` is each row's
    median over the block's fused row (its reference row where no fused row ran). load_average and
    cuda describe the machine the rows ran on (default: this one, now), so that a stored record
    renders the same anywhere (benchmarks/readme_tables.py).
    """
    cuda = HAS_CUDA if cuda is None else cuda
    if load_average is None:
        load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    lines = []
    header = (f"{'variant':<20} {'median':>9} {'p20..p80':>19} {'TFLOP/s':>8} {'GB/s':>8} {'roof':>6} "
              f"{'peak mem':>10} {'ratio':>7}")
    ops: dict[str, dict[tuple, list]] = {}
    for rec in records:
        ops.setdefault(rec["op"], {}).setdefault((rec["passes"], rec["shape"]), []).append(rec)
    for op, blocks in ops.items():
        lines.append("")
        lines.append(f"-- {op} " + "-" * max(0, REPORT_WIDTH - len(op) - 4))
        for (passes, shape), rows in blocks.items():
            base = next((r for r in rows if r["variant"].startswith("fused")), None) or \
                next((r for r in rows if r["variant"] == "reference"), rows[0])
            flops, bytes_ = rows[0].get("flops"), rows[0].get("bytes")
            cost = []
            if flops:
                cost.append(f"{flops / 1e9:.4g} GFLOP")
            if bytes_:
                cost.append(f"{bytes_ / 1e6:.4g} MB")
            lines.append(f"{passes} | {shape} | {rows[0]['dtype']} | per call: {', '.join(cost) or 'not modelled'}")
            lines.append(header)
            for r in rows:
                # flops_label: what the variant itself computes where it differs by variant (KL)
                name = r["variant"] + (f" {r['flops_label']}" if r.get("flops_label") else "") + \
                    (" [interp]" if r.get("interpreted") else "")
                spread = f"{_time(r['p20_s'])}..{_time(r['p80_s'])}"
                roof = f"{100 * r['peak_fraction']:.1f}%" if "peak_fraction" in r else "-"
                ratio = r["median_s"] / base["median_s"]
                lines.append(f"{name[:20]:<20} {_time(r['median_s']):>9} {spread:>19} {_rate(r.get('TFLOPs')):>8} "
                             f"{_rate(r.get('GBps')):>8} {roof:>6} {_bytes(r.get('peak_memory_bytes')):>10} "
                             + (f"{ratio:>6.3g}x" if ratio < 1000 else f"{ratio:>6.0f}x"))
    notes = []
    if peaks is not None:
        notes.append(f"Device: {device}. roof: fraction of the {peaks['model']} roofline reached, compute or "
                     f"memory, whichever is nearer (datasheet: bf16 {peaks['bf16']:g}, tf32 {peaks['tf32']:g}, "
                     f"fp32 {peaks['fp32']:g} TFLOP/s, HBM {peaks['hbm_GBps']:g} GB/s).")
    elif cuda:
        notes.append(f"Device: {device}: unknown device, no entry in the peak table (benchmarks/harness.py "
                     "PEAKS), so no fraction of peak.")
    else:
        notes.append(f"Device: {device}. These are CPU timings: GPU speed needs a GPU (pytest --benchmark "
                     "on a CUDA machine).")
        if any(r.get("interpreted") for r in records):
            notes.append("[interp] rows ran the Triton kernels under Triton's interpreter: they check "
                         "that the kernels run, their times mean nothing.")
        else:
            notes.append("The Triton-kernel rows are left out: here they would run under Triton's "
                         "interpreter (--bench-interpreter brings them back).")
    if load_average > (os.cpu_count() or 1):
        notes.append(f"The host was busy (load average {load_average:.1f} on {os.cpu_count()} cores): other "
                     "processes took CPU time from these runs, so the times are inflated and noisy.")
    notes.append("median, p20..p80: time per call. TFLOP/s, GB/s: the cost model's FLOPs and bytes per "
                 "call over the median. peak mem: one call's peak above what existed before it. ratio: "
                 "median over the block's fused row (its reference row where no fused row ran).")
    lines.append("")
    for note in notes:
        lines.extend(textwrap.wrap(note, REPORT_WIDTH, break_on_hyphens=False))
    return [line[:REPORT_WIDTH] for line in lines]

