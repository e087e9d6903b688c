"""The profiling suite's plumbing: `pytest --benchmark`, the cost model, the report, gpu_check --smoke.

The timed runs themselves are CI's `pytest --benchmark` line; these tests check what must hold
without timing anything: which files each command collects, that the option cannot be mistaken for
one of pytest-benchmark's, the peak table's lookup, the report's width, and that the one-shot GPU
script runs end to end at tiny sizes on CPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402  (benchmarks/ is not a package)


def _pytest(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_benchmark_option_collects_the_benchmarks_alone():
    out = _pytest("--benchmark", "--co", "-q")
    assert out.returncode == 0, out.stdout + out.stderr
    collected = [line for line in out.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("benchmarks/bench_") for line in collected)
    ops = {line.split("::")[0] for line in collected}
    assert ops == {f"benchmarks/bench_{op}.py" for op in
                   ("topk_encoder", "relu_encoder", "sparse_decoder", "relu_autoencoder", "linear_kl", "e2e_step",
                    "analysis", "dashboard", "batchtopk", "matryoshka")}


def test_benchmark_option_deselects_tests_named_beside_it():
    out = _pytest("--benchmark", "--co", "-q", "tests/test_config.py")
    assert "deselected" in out.stdout and "::" not in out.stdout, out.stdout


def test_benchmark_option_is_not_a_prefix_of_pytest_benchmarks_options():
    # pytest's parser has argparse's prefix matching off: an abbreviation is an error, not a guess
    out = _pytest("--benchmark-o", "--co", "-q")
    assert out.returncode != 0 and "unrecognized arguments: --benchmark-o" in out.stderr


def test_plain_pytest_never_collects_the_benchmarks():
    out = _pytest("--co", "-q", "tests/test_config.py")
    assert out.returncode == 0 and "benchmarks/" not in out.stdout


@pytest.mark.parametrize("name, model", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H200", "H200 SXM"),
                                         ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
                                         ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
                                         ("NVIDIA H200 NVL", "H200 NVL")])
def test_peak_table_lookup(name, model):
    assert harness.device_peaks(name)["model"] == model


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA GH200 480GB"])
def test_peak_table_unknown_device(name):
    assert harness.device_peaks(name) is None


def test_cost_model_matches_the_guide():
    N, d, n, k, V = 16384, 768, 46080, 32, 50257
    assert harness.linear_kl_cost(N, d, V, 2, "fwd_bwd")[0] == 6 * N * d * V
    assert harness.topk_encoder_cost(N, d, n, k, 2, "fwd")[0] == 2 * N * d * n
    flops, bytes_ = harness.sparse_decoder_cost(N, k, n, d, 2, "fwd")
    assert flops == 2 * N * k * d and bytes_ > N * k * d * 2  # bound by the gathered rows
    # a ReLU SAE step: one dense GEMM (the encoder) plus O(N * L0 * d) for the decoder and the gradients
    l0 = 50
    assert harness.relu_autoencoder_cost(N, d, n, l0, 2, "fwd_bwd")[0] == 2 * N * d * n + 10 * N * l0 * d
    # a transcoder (d_in 768 -> d_out 3,072): the encoder GEMM over d_in, the decode over d_out
    d_out = 3072
    assert harness.relu_autoencoder_cost(N, d, n, l0, 2, "fwd", d_out=d_out)[0] == 2 * N * d * n + 2 * N * l0 * d_out
    assert (harness.relu_autoencoder_cost(N, d, n, l0, 2, "fwd_bwd", d_out=d_out)[0]
            == 2 * N * d * n + 6 * N * l0 * d_out + 4 * N * l0 * d)
    assert (harness.relu_autoencoder_cost(N, d, n, l0, 2, "fwd", d_out=d_out)[1]
            - harness.relu_autoencoder_cost(N, d, n, l0, 2, "fwd")[1]) == 2 * (N + min(n, N * l0)) * (d_out - d)
    e2e = harness.train_step_cost("e2e", 12, d, V, 1024, 6, n, 16)
    local = harness.train_step_cost("local", 12, d, V, 1024, 6, n, 16)
    assert e2e > local > 0


def test_report_fits_100_columns_and_names_the_limit():
    record = dict(op="fused_linear_kl", shape="N=16384 d=4096 V=128256", passes="fwd_bwd", dtype="bfloat16",
                  flops=6 * 16384 * 4096 * 128256, bytes=10**9, median_s=0.123456, p20_s=0.1, p80_s=0.2,
                  TFLOPs=512.3, GBps=8.1, peak_fraction=0.518, peak_limit="bf16 TFLOP/s",
                  peak_memory_bytes=3 * 2**30, interpreted=False)
    rows = [dict(record, variant="fused"), dict(record, variant="reference", median_s=0.5),
            dict(record, variant="naive", median_s=1.0)]
    lines = harness.report_lines(rows, harness.device_peaks("NVIDIA H200"), "NVIDIA H200")
    assert max(map(len, lines)) <= harness.REPORT_WIDTH
    text = "\n".join(lines)
    assert "51.8%" in text and "8.1x" in text and "4.05x" in text and "H200" in text


def test_gpu_check_budgets_every_part():
    """A part without a budget would stop the one GPU run with a KeyError, after the machine started."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    parts = (set(gpu_check.PARTS) - {"bench"}) | set(gpu_check.BENCH_FILES)
    assert parts <= set(gpu_check.BUDGETS), sorted(parts - set(gpu_check.BUDGETS))
    assert sum(v for k, v in gpu_check.BUDGETS.items() if k != "distributed") <= 570  # one GPU: ~9.5 min


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    """The one-shot GPU script at tiny sizes: the training workers and the part bookkeeping (CI's
    .ci/run runs every part, the benchmarks included)."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--parts", "train_e2e,distributed",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] and set(report["parts"]) == {"train_e2e", "distributed"}
    e2e = report["parts"]["train_e2e"]
    assert e2e["status"] == "ok" and e2e["steps"] == 3 and e2e["tokens_per_s"] > 0
    assert all(isinstance(v, float) and v == v for k, v in e2e["last_metrics"].items() if k.startswith("loss"))
    dp = report["parts"]["distributed"]  # torchrun, 2 gloo ranks vs one process
    assert dp["status"] == "ok" and dp["backend"] == "gloo", dp
    assert dp["kl_relative_difference"] < 1e-4, dp  # fp32 on CPU: only the summation order differs
