"""fused_linear_kl, forward and forward + backward: the fused Triton kernels vs the chunked PyTorch
reference vs the naive dense form (materialized logits, log_softmax, kl_div(batchmean), autograd).

Variants: "fused" (forward: the loss-only kernel; forward + backward: the one-sweep kernel, loss and
gradient in one sweep over W_U), "fused_two_pass" (forward + backward only: the loss kernel, then
the gradient's own sweep in backward), "reference", "naive". Each row's name carries the FLOPs the
variant computes (harness.linear_kl_flops: 4*N*d*V forward for all; with the gradient 8 one-sweep,
10 two-pass, 6 reference and naive); TFLOP/s and the roofline use the must-do count
(harness.linear_kl_cost: 4, and 6 with the gradient, GUIDE section 5's floor), so the rows compare.

Shapes (N, d, V): on a GPU ("full", bf16) the GPT-2 preset (16 x 1,024 tokens, d 768, V 50,257) and
d 4,096 with V 128,256; on CPU "full" is the README's CPU target (fp32, N 2,048, d 768, V 50,257:
reference vs naive), "small" a shape the interpreter gets through.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import (DEVICE, DTYPE, GPT2_PRESET, HAS_CUDA, LARGE, LINEAR_KL_FLOPS, bench_size, linear_kl_cost,
                     linear_kl_flops, measure, variants)

from fastsae import ops

SHAPES = {
    "full": [tuple(s[key] for key in "NdV") for s in (GPT2_PRESET, LARGE)] if HAS_CUDA else [(2048, 768, 50_257)],
    "small": [(64, 64, 500)],  # tiny: the interpreter (--bench-interpreter) gets through
}
VARIANTS = variants(("fused", "fused_two_pass", "reference", "naive"), triton_variants=("fused", "fused_two_pass"))
PASSES = ("fwd", "fwd_bwd")


def make_step(shape, variant, passes, dtype=DTYPE, device=DEVICE):
    """A closure running one forward (+ backward) of `variant` at `shape` on fixed random inputs."""
    n, d, v = shape
    backward = passes == "fwd_bwd"
    gen = torch.Generator(device=device).manual_seed(0)  # on the device: W_U at d=4096 is 525M values
    h_orig = torch.randn(n, d, generator=gen, device=device)
    h_sae = (h_orig + 0.3 * torch.randn(n, d, generator=gen, device=device)).to(dtype).requires_grad_(backward)
    W_U = (torch.randn(d, v, generator=gen, device=device) / d ** 0.5 * 3).to(dtype)
    b_U = torch.randn(v, generator=gen, device=device).to(dtype)
    h_orig = h_orig.to(dtype)

    def loss():
        if variant == "naive":
            log_q = F.log_softmax((h_sae @ W_U + b_U).float(), dim=-1)
            log_p = F.log_softmax((h_orig @ W_U + b_U).float(), dim=-1)
            return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        if variant == "fused_two_pass":  # not an op option: the kernel's entry point (needs triton)
            from fastsae.kernels.linear_kl import linear_kl_triton

            return linear_kl_triton(h_sae, h_orig, W_U, b_U, one_sweep=False)[0]
        return ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, backend="triton" if variant == "fused" else "torch")

    def step():
        if not backward:
            with torch.no_grad():
                return loss()
        h_sae.grad = None
        loss().backward()

    return step


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[bench_size()], ids=lambda s: "N{}-d{}-V{}".format(*s))
def test_linear_kl(benchmark, shape, variant, passes):
    n, d, v = shape
    if variant == "fused_two_pass" and passes == "fwd":
        pytest.skip("without a gradient the two-pass path is the loss-only kernel: the fused row")
    naive_bytes = 8 * n * v * 4  # both runs' logits, their fp32 copies and log-softmaxes, gradients
    if HAS_CUDA and variant == "naive" and naive_bytes > 0.8 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip(f"the naive form needs ~{naive_bytes / 2**30:.0f} GiB at N={n}, V={v}")
    step = make_step(shape, variant, passes)
    step()  # compile (GPU) / warm up before timing
    flops, bytes_ = linear_kl_cost(n, d, v, DTYPE.itemsize, passes)
    slow = not HAS_CUDA and bench_size() == "full"  # seconds per call on CPU
    measure(benchmark, step, op="fused_linear_kl", shape=f"N={n} d={d} V={v}", variant=variant, passes=passes,
            dtype=DTYPE, flops=flops, bytes_=bytes_, triton=variant.startswith("fused"),
            pedantic=dict(rounds=5, warmup_rounds=0, iterations=1) if slow else None, N=n, d=d, V=v,
            flops_done=linear_kl_flops(variant, n, d, v, passes),
            flops_label=f"{LINEAR_KL_FLOPS[variant][passes]}NdV")
