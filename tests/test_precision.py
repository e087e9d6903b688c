"""The precisions that run on CUDA, checked on CPU: every kernel behind the public ops
(backend="triton"), forward and gradients, with fp32 inputs under torch's matmul precision "high"
(TF32 tensor-core operands, the trainer's CUDA default) and "medium" (bf16 operands), against
float64, within bounds derived from the operands' rounding (helpers_precision.py).

Triton's interpreter ignores TF32 and mishandles bf16 (helpers_precision.py), so the kernels run
under gpu_rounding(), which makes its tl.dot and casts round as the GPU does. That the patch is in
effect is checked on a bare tl.dot, and in the kernels whose products certainly run on the tensor
cores (the encoders' GEMM, the KL's logits): their results must be off by far more than fp32
rounding, so those tests cannot pass because nothing was rounded. The decoders' kernels may
gather with CUDA-core FMAs on some paths; their bounds hold either way (u = 0 is a special case).

The ops are called through fastsae.ops only: the kernels behind them may change (tiles, sparse
paths); the bounds follow from the math each op computes, not from how.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, HAS_TRITON
from helpers_precision import (BF16_NEAREST_UNIT, FP32_UNIT, TF32_TRUNCATED_UNIT, UNIT_ROUNDOFF, bf16_bits_to_fp32,
                               fp32_to_bf16_bits, fp32_to_tf32, gamma, gpu_rounding, matmul_error_bound,
                               matmul_precision)

from fastsae import ops

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
              pytest.mark.skipif(HAS_CUDA, reason="the interpreter's rounding is patched; on a GPU the tensor cores "
                                                  "round (tests marked gpu)")]

MODES = ["high", "medium"]  # TF32 and bf16 operands
triton_backend = {"backend": "triton"}


def rounded_run(precision: str):
    """The context a kernel call runs in: the matmul precision, and the GPU's rounding."""
    stack = contextlib.ExitStack()
    stack.enter_context(matmul_precision(precision))
    stack.enter_context(gpu_rounding())
    return stack


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_within(name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> float:
    """|got - want| <= bound elementwise (float64); returns the largest error / bound."""
    error = (got.detach().double().cpu() - want.double()).abs()
    over = error > bound
    assert not over.any(), (f"{name}: {int(over.sum())} entries past their bound; worst error {error[over].max():.3g} "
                            f"vs bound {bound[over][error[over].argmax()]:.3g}")
    return float((error / bound.clamp_min(1e-300)).max())


def grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad for several outputs at once (None where an input gets no gradient)."""
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


# ---------------------------------------------------------------------------------- the patch itself

def _dot_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, bf16_ptr, MODE: tl.constexpr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        acc = tl.zeros((N, N), tl.float32)
        if MODE == "bf16":
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=MODE)
        tl.store(c_ptr + r[:, None] * N + r[None, :], acc)
        tl.store(bf16_ptr + r[:, None] * N + r[None, :], a.to(tl.bfloat16))

    return dot_kernel


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_patch_rounds_the_dot_and_the_cast_as_the_gpu(mode):
    """A bare tl.dot: unpatched, TF32 is full fp32 and bf16 is garbage; patched, both equal the
    product of the rounded operands (truncated TF32; bf16 to nearest even, as torch rounds), and
    fp32 -> bf16 casts equal torch's."""
    a = torch.randn(32, 32, generator=gen(0))
    b = torch.randn(32, 32, generator=gen(1))
    kernel = _dot_kernel()
    exact = a.double() @ b.double()
    if mode == "tf32":
        rounded = [torch.from_numpy(fp32_to_tf32(t.numpy())).double() for t in (a, b)]
    else:
        rounded = [t.bfloat16().double() for t in (a, b)]
    emulated = rounded[0] @ rounded[1]
    results = {}
    for patched in (False, True):
        out, cast = torch.empty(32, 32), torch.empty(32, 32, dtype=torch.bfloat16)
        with gpu_rounding() if patched else contextlib.nullcontext():
            kernel[(1,)](a, b, out, cast, MODE=mode, N=32)
        results[patched] = (out.double(), cast)
    # unpatched: TF32 ignored (fp32-exact), bf16 dots on raw bits
    if mode == "tf32":
        assert (results[False][0] - exact).abs().max() < 1e-4
    else:
        assert (results[False][0] - exact).abs().max() > 1e3
    assert not torch.equal(results[False][1], a.bfloat16())  # truncating cast: some entries differ
    # patched: the rounded operands' product up to one fp32 rounding, and the GPU's cast
    torch.testing.assert_close(results[True][0], emulated, atol=0, rtol=2 * FP32_UNIT)
    assert (results[True][0] - exact).abs().max() > 1e-3  # the rounding is there
    assert torch.equal(results[True][1], a.bfloat16())


def test_rounding_helpers_match_torch():
    x = torch.randn(4096, generator=gen(2)) * torch.logspace(-20, 20, 4096)
    bits = fp32_to_bf16_bits(x.numpy())
    assert torch.equal(torch.from_numpy(bf16_bits_to_fp32(bits)), x.bfloat16().float())
    tf32 = torch.from_numpy(fp32_to_tf32(x.numpy()))
    relative = ((tf32.double() - x.double()) / x.double())
    assert relative.abs().max() < TF32_TRUNCATED_UNIT and (relative <= 0).all()  # toward zero
    nearest = torch.from_numpy(fp32_to_tf32(x.numpy(), "rne"))
    assert ((nearest.double() - x.double()) / x.double()).abs().max() <= 2.0**-11
    bf16 = x.bfloat16().double()
    assert ((bf16 - x.double()) / x.double()).abs().max() <= BF16_NEAREST_UNIT


# ---------------------------------------------------------------------------------- encoders and decoders

def encoder_inputs(n_tokens=24, d_in=48, n_latents=96, seed=0):
    g = gen(seed)
    x = torch.randn(n_tokens, d_in, generator=g)
    W_enc = torch.randn(d_in, n_latents, generator=g) / d_in**0.5
    b_enc = 0.1 * torch.randn(n_latents, generator=g)
    return x, W_enc, b_enc


def run_encoder(op, precision, x, W_enc, b_enc, *extra):
    x, W_enc, b_enc = (t.clone().requires_grad_() for t in (x, W_enc, b_enc))
    with rounded_run(precision):
        out = op(x, W_enc, b_enc, *extra, **triton_backend)
        values = out[0] if isinstance(out, tuple) else out
        grad_out = torch.randn(values.shape, generator=gen(9))
        grad_x, grad_W, grad_b = grads(values, (x, W_enc, b_enc), grad_out)
    return out, grad_out, grad_x, grad_W, grad_b


@pytest.mark.parametrize("precision", MODES)
def test_relu_encode(precision):
    """acts = ReLU(x @ W + b): the pre-activations' bound carries through the ReLU (1-Lipschitz);
    the gradients, given the kernel's own active set, are products of exact and rounded operands."""
    u = UNIT_ROUNDOFF[precision]
    x, W_enc, b_enc = encoder_inputs()
    acts, grad_out, grad_x, grad_W, grad_b = run_encoder(ops.relu_encode, precision, x, W_enc, b_enc)
    pre = x.double() @ W_enc.double() + b_enc.double()
    bound = matmul_error_bound(x.abs(), W_enc.abs(), u) + FP32_UNIT * (pre.abs() + b_enc.double().abs())
    ratio = assert_within("acts", acts, pre.clamp_min(0), bound)
    # the kernel's active set: the truth's wherever the pre-activation is clear of the bound
    active = acts.detach() > 0
    clear = pre.abs() > bound
    assert torch.equal(active[clear], (pre > 0)[clear])
    g = torch.where(active, grad_out, 0.0).double()
    assert_within("grad_x", grad_x, g @ W_enc.double().t(), matmul_error_bound(g.abs(), W_enc.abs().t(), u))
    assert_within("grad_W_enc", grad_W, x.double().t() @ g, matmul_error_bound(x.abs().t(), g.abs(), u))
    assert_within("grad_b_enc", grad_b, g.sum(0), gamma(x.shape[0]) * g.abs().sum(0))
    # not vacuous: the GEMM's operands were rounded (fp32 would be ~1e4 times closer)
    assert (acts.detach().double() - pre.clamp_min(0)).abs().max() > 1e-2 * u * bound.max() / (2 * u + gamma(48))
    assert ratio > 0


@pytest.mark.parametrize("precision", MODES)
def test_topk_encode(precision):
    """values = the k largest ReLU(x @ W + b): each returned value within the bound of the true
    pre-activation of its latent, the selection a top-k up to the bound; the gradients, given the
    kernel's indices, within the bounds of their products."""
    u, k = UNIT_ROUNDOFF[precision], 8
    x, W_enc, b_enc = encoder_inputs(seed=1)
    (values, indices), grad_out, grad_x, grad_W, grad_b = run_encoder(ops.topk_encode, precision, x, W_enc, b_enc, k)
    pre = x.double() @ W_enc.double() + b_enc.double()
    bound = matmul_error_bound(x.abs(), W_enc.abs(), u) + FP32_UNIT * (pre.abs() + b_enc.double().abs())
    picked_pre, picked_bound = pre.gather(1, indices), bound.gather(1, indices)
    assert_within("values", values, picked_pre.clamp_min(0), picked_bound)
    kth = pre.topk(k, dim=1).values[:, -1:]
    assert (picked_pre >= kth - 2 * bound.max(1, keepdim=True).values).all()  # a top-k up to rounding
    g = torch.where(values.detach() > 0, grad_out, 0.0).double()  # [N, k], at the kernel's indices
    W_picked = W_enc.double().t()[indices]  # [N, k, d]
    want_x = torch.einsum("nk,nkd->nd", g, W_picked)
    bound_x = (2 * u + u**2 + gamma(k)) * torch.einsum("nk,nkd->nd", g.abs(), W_picked.abs())
    assert_within("grad_x", grad_x, want_x, bound_x)
    onehot = torch.zeros(x.shape[0], W_enc.shape[1], dtype=torch.float64).scatter_add_(1, indices, g)
    assert_within("grad_W_enc", grad_W, x.double().t() @ onehot, matmul_error_bound(x.abs().t(), onehot.abs(), u))
    assert_within("grad_b_enc", grad_b, onehot.sum(0), gamma(x.shape[0] * k) * onehot.abs().sum(0))
    assert (values.detach().double() - picked_pre.clamp_min(0)).abs().max() > 1e-2 * u  # rounded


@pytest.mark.parametrize("d_out", [48, 80], ids=["sae", "transcoder"])
@pytest.mark.parametrize("precision", MODES)
def test_relu_autoencode(precision, d_out):
    """reconstruction = ReLU(x @ W_enc + b_enc) @ W_dec + b_dec and lp_sum (p = 1), with their
    gradients; as an SAE (d_out = d_in = 48) and a transcoder (writing d_out = 80). The code is within the pre-activations' bound of the truth wherever it is
    (ReLU is 1-Lipschitz), so the decode carries that bound through |W_dec|; gradients are bounded
    over the latents the truth activates plus those whose pre-activation is within its bound of 0
    (the kernel may take either side there)."""
    u = UNIT_ROUNDOFF[precision]
    x, W_enc, b_enc = encoder_inputs(seed=6)
    _, _, W_dec, b_dec = decoder_inputs(seed=7, d_in=d_out)
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    with rounded_run(precision):
        out = ops.relu_autoencode(*leaves, **triton_backend)
        grad_recon = torch.randn(out.reconstruction.shape, generator=gen(10))
        grad_lp = torch.randn(out.lp_sum.shape, generator=gen(11))
        grad_x, grad_W_enc, _, grad_W_dec, _ = grads((out.reconstruction, out.lp_sum), leaves, (grad_recon, grad_lp))
    pre = x.double() @ W_enc.double() + b_enc.double()
    bound_pre = matmul_error_bound(x.abs(), W_enc.abs(), u) + FP32_UNIT * (pre.abs() + b_enc.double().abs())
    code = pre.clamp_min(0)
    Wd = W_dec.double()
    want = code @ Wd + b_dec.double()
    bound = (bound_pre @ Wd.abs() + matmul_error_bound(code + bound_pre, W_dec.abs(), u)
             + FP32_UNIT * (want.abs() + b_dec.double().abs()))
    assert_within("reconstruction", out.reconstruction, want, bound)
    assert_within("lp_sum", out.lp_sum, code.sum(1), bound_pre.sum(1) + gamma(code.shape[1]) * code.sum(1))

    unsure = pre.abs() <= bound_pre  # the kernel's ReLU may go either way here
    active = pre > 0
    go = grad_recon.double()
    g_code = go @ Wd.t() + grad_lp.double()[:, None]
    bound_g = matmul_error_bound(go.abs(), W_dec.abs().t(), u) + FP32_UNIT * g_code.abs()
    g_pre = torch.where(active, g_code, 0.0)
    slack = torch.where(unsure, g_code.abs() + bound_g, torch.where(active, bound_g, 0.0))
    assert_within("grad_x", grad_x, g_pre @ W_enc.double().t(),
                  matmul_error_bound(g_pre.abs() + slack, W_enc.abs().t(), u) + slack @ W_enc.double().abs().t())
    assert_within("grad_W_enc", grad_W_enc, x.double().t() @ g_pre,
                  matmul_error_bound(x.abs().t(), g_pre.abs() + slack, u) + x.double().abs().t() @ slack)
    assert_within("grad_W_dec", grad_W_dec, code.t() @ go,
                  matmul_error_bound((code + bound_pre).t(), go.abs(), u) + bound_pre.t() @ go.abs())
    # not vacuous: the encoder GEMM's operands were rounded
    assert (out.lp_sum.detach().double() - code.sum(1)).abs().max() > 1e-3 * u


def decoder_inputs(n_tokens=24, n_latents=96, d_in=48, k=8, seed=3):
    g = gen(seed)
    W_dec = torch.randn(n_latents, d_in, generator=g) / d_in**0.5
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    values = torch.rand(n_tokens, k, generator=g) * 3
    indices = torch.stack([torch.randperm(n_latents, generator=g)[:k] for _ in range(n_tokens)])
    return values, indices, W_dec, b_dec


@pytest.mark.parametrize("precision", MODES)
def test_sparse_decode(precision):
    """x_hat = sum_j v_j W_dec[idx_j] + b_dec and its gradients: each a sum of k (or N k) products,
    within (2u + u^2 + gamma) of the sum of their magnitudes (u = 0 where the kernel does not use
    the tensor cores: the bound holds either way)."""
    u = UNIT_ROUNDOFF[precision]
    values, indices, W_dec, b_dec = decoder_inputs()
    v, W, b = (t.clone().requires_grad_() for t in (values, W_dec, b_dec))
    with rounded_run(precision):
        out = ops.sparse_decode(v, indices, W, b, **triton_backend)
        grad_out = torch.randn(out.shape, generator=gen(4))
        grad_v, grad_W, grad_b = grads(out, (v, W, b), grad_out)
    dense = torch.zeros(values.shape[0], W_dec.shape[0], dtype=torch.float64).scatter_add_(1, indices, values.double())
    want = dense @ W_dec.double() + b_dec.double()
    bound = matmul_error_bound(dense.abs(), W_dec.abs(), u) + FP32_UNIT * want.abs() + FP32_UNIT * b_dec.abs()
    assert_within("x_hat", out, want, bound)
    go = grad_out.double()
    W_picked = W_dec.double()[indices]  # [N, k, d]
    assert_within("grad_values", grad_v, torch.einsum("nd,nkd->nk", go, W_picked),
                  (2 * u + u**2 + gamma(W_dec.shape[1])) * torch.einsum("nd,nkd->nk", go.abs(), W_picked.abs()))
    assert_within("grad_W_dec", grad_W, dense.t() @ go, matmul_error_bound(dense.abs().t(), go.abs(), u))
    assert_within("grad_b_dec", grad_b, go.sum(0), gamma(go.shape[0]) * go.abs().sum(0))


@pytest.mark.parametrize("precision", MODES)
def test_dense_decode(precision):
    """x_hat = acts @ W_dec + b_dec (a ReLU code: about half zeros) and its gradients."""
    u = UNIT_ROUNDOFF[precision]
    g = gen(5)
    acts = torch.relu(torch.randn(24, 96, generator=g))
    _, _, W_dec, b_dec = decoder_inputs()
    a, W, b = (t.clone().requires_grad_() for t in (acts, W_dec, b_dec))
    with rounded_run(precision):
        out = ops.dense_decode(a, W, b, **triton_backend)
        grad_out = torch.randn(out.shape, generator=gen(6))
        grad_a, grad_W, grad_b = grads(out, (a, W, b), grad_out)
    want = acts.double() @ W_dec.double() + b_dec.double()
    bound = matmul_error_bound(acts.abs(), W_dec.abs(), u) + FP32_UNIT * (want.abs() + b_dec.double().abs())
    assert_within("x_hat", out, want, bound)
    go = grad_out.double()
    assert_within("grad_acts", grad_a, go @ W_dec.double().t(), matmul_error_bound(go.abs(), W_dec.abs().t(), u))
    assert_within("grad_W_dec", grad_W, acts.double().t() @ go, matmul_error_bound(acts.abs().t(), go.abs(), u))
    assert_within("grad_b_dec", grad_b, go.sum(0), gamma(go.shape[0]) * go.abs().sum(0))


# ---------------------------------------------------------------------------------- fused linear KL

def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t (fp32) as the tensor cores see it under the matmul precision, float64."""
    if precision == "high":
        return torch.from_numpy(fp32_to_tf32(t.detach().float().numpy())).double()
    if precision == "medium":
        return t.detach().float().bfloat16().double()
    return t.detach().double()


def kl_reference(h_sae, h_orig, W_U, b_U, precision, softcap=None, weight=None):
    """The fused KL's float64 reference on the operands its logit products see: h_orig,
    delta = fp32(h_sae - h_orig) (the kernel's own operand) and W_U rounded as the tensor cores
    round them (round_operand); bias, cap, softmax, KL and gradient in float64. Returns (KL per
    token, its tolerance, the gradient of sum(weight * KL), its tolerance).

    What the reference does not model, and so what the tolerances hold (derived):
    - the gradient's own product: its operands (p and p expm1(x) of the one-sweep kernel,
      combined as G1 - u_c G0 with u_c = E_p[exp(D - c)] - 1 about its centre c; q - p in the
      two-pass kernel, which the same sum bounds) are rounded too, so it is off by at most
      (2u + u^2 + gamma_V) w sum_v (|q_v - p_v| + 2 |u_c| p_v / (1 + u_c)) cap'_v |W_U[k, v]|
      (helpers_precision.py: a product of rounded operands);
    - fp32 evaluation (everything else the kernel does is fp32): 1e-4 of the KL and 1e-5 of the
      largest gradient entry, the bounds test_linear_kl.py holds the fp32 kernel to.
    """
    unit = UNIT_ROUNDOFF[precision]
    W = round_operand(W_U, precision)
    delta = round_operand(h_sae.detach().float() - h_orig.float(), precision)
    h = round_operand(h_orig, precision)
    bias = 0 if b_U is None else b_U.double()
    a_raw, d_raw = h @ W + bias, delta @ W
    if softcap is None:
        a, d, slope = a_raw, d_raw, torch.ones_like(a_raw)
    else:
        a = softcap * torch.tanh(a_raw / softcap)
        d = softcap * torch.tanh((a_raw + d_raw) / softcap) - a
        slope = 1 / torch.cosh((a_raw + d_raw) / softcap) ** 2
    log_p, log_q = F.log_softmax(a, -1), F.log_softmax(a + d, -1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    weight = torch.ones(kl.shape[0], dtype=torch.float64) if weight is None else weight.double()
    grad = weight[:, None] * (((q - p) * slope) @ W.t())
    centre = (a + d).max(-1, keepdim=True).values - a.max(-1, keepdim=True).values
    u_c = (p * torch.exp(d - centre)).sum(-1, keepdim=True) - 1
    operands = ((q - p).abs() + 2 * u_c.abs() * p / (1 + u_c)) * slope
    grad_tol = (2 * unit + unit**2 + gamma(W.shape[1])) * weight.abs()[:, None] * (operands @ W.abs().t())
    return kl, 1e-4 * kl, grad, grad_tol + 1e-5 * grad.abs().max()


def exact_kl(h_sae, h_orig, W_U, b_U, softcap=None):
    """KL per token from the float64 inputs, nothing rounded."""
    return kl_reference(h_sae, h_orig, W_U, b_U, "highest", softcap)[0]


KL_CASES = {"bias": dict(softcap=None, noise=0.3), "softcap": dict(softcap=8.0, noise=0.3),
            "small_kl": dict(softcap=None, noise=3.5e-3)}


@pytest.mark.parametrize("case", list(KL_CASES))
@pytest.mark.parametrize("reduction", ["sum", "none"], ids=["one_sweep", "two_pass"])
@pytest.mark.parametrize("precision", MODES)
def test_fused_linear_kl(precision, reduction, case):
    """The KL per token and the gradient wrt h_sae (one-sweep kernel for a sum, forward + two-pass
    gradient for "none") against kl_reference, N = 17, d = 40, V = 301 with a bias, several
    vocabulary slices and tiles. Worst-case bounds through the softmax (as the encoders use) would
    exceed a KL of 5e-5 itself: the logits' errors, 2u |h| |W_U| each, are far larger than the
    change D the KL measures. So the reference takes the rounded operands, and the tolerances cover
    what it leaves out."""
    from fastsae.kernels.linear_kl import linear_kl_triton

    softcap, noise = KL_CASES[case]["softcap"], KL_CASES[case]["noise"]
    g = gen(11)
    h_orig = torch.randn(17, 40, generator=g)
    h_sae = (h_orig + noise * torch.randn(17, 40, generator=g)).requires_grad_()
    W_U = torch.randn(40, 301, generator=g) / 40**0.5 * (6 if softcap else 3)
    b_U = torch.randn(301, generator=g)
    tiles = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=4, num_stages=1)
    with rounded_run(precision):
        kl, _ = linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, "none", -100, softcap, config=tiles, n_slices=3)
        loss, _ = linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, reduction, -100, softcap, config=tiles,
                                   n_slices=3)
        weight = torch.rand(17, generator=gen(12))
        (grad,) = torch.autograd.grad(loss if reduction == "sum" else (loss * weight).sum(), h_sae)
    want_kl, kl_tol, want_grad, grad_tol = kl_reference(h_sae, h_orig, W_U, b_U, precision, softcap,
                                                        None if reduction == "sum" else weight)
    assert_within("kl", kl, want_kl, kl_tol)
    assert_within("grad_h_sae", grad, want_grad, grad_tol)
    # not vacuous: the operands' rounding moves the KL by more than twice the tolerance, so a kernel
    # that skipped it (or a patch that did not act) fails the comparison above
    exact = exact_kl(h_sae, h_orig, W_U, b_U, softcap)
    assert ((want_kl - exact).abs() / exact).max() > 2e-4
    if case == "small_kl":  # a good SAE's KL, as in test_linear_kl.py's small-KL test
        assert exact.mean() < 2e-4


@pytest.mark.parametrize("case", list(KL_CASES))
def test_fused_linear_kl_bf16_inputs_round_the_difference_once(case):
    """bf16 inputs. The kernel's logit products take h_orig and W_U as they are and the difference
    delta = h_sae - h_orig rounded once to bf16 (a tensor-core product takes bf16 operands; forming
    the difference in fp32 first gives the same rounding); the reference (backend="torch") keeps
    delta in fp32. Against the float64 reference on the kernel's operands: within the fp32
    tolerances, so that rounding is the only difference. Against the reference op: within its
    first-order effect, which kernels/linear_kl.py's docstring states: per token
    u * max_v (|delta| @ |W_U|)_v * sum_v |q_v - p_v| on the KL (u = 2^-8, bf16's unit roundoff),
    and 2 u max_v (|delta| @ |W_U|)_v sum_v q_v |W_U[k, v]| on the gradient."""
    from fastsae.kernels.linear_kl import linear_kl_triton

    softcap, noise = KL_CASES[case]["softcap"], KL_CASES[case]["noise"]
    g = gen(13)
    h_orig = torch.randn(17, 40, generator=g).bfloat16()
    h_sae = (h_orig.float() + noise * torch.randn(17, 40, generator=g)).bfloat16().requires_grad_()
    W_U = (torch.randn(40, 301, generator=g) / 40**0.5 * (6 if softcap else 3)).bfloat16()
    b_U = torch.randn(301, generator=g).bfloat16()
    tiles = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=4, num_stages=1)
    with gpu_rounding():
        kl, _ = linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, "none", -100, softcap, config=tiles, n_slices=3)
        loss, _ = linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, "sum", -100, softcap, config=tiles, n_slices=3)
        (grad,) = torch.autograd.grad(loss, h_sae)
    as_fp32 = [t.detach().float() for t in (h_sae, h_orig, W_U, b_U)]
    want_kl, kl_tol, want_grad, grad_tol = kl_reference(*as_fp32, "medium", softcap)  # delta rounded to bf16
    assert_within("kl", kl, want_kl, kl_tol)
    assert_within("grad_h_sae", grad, want_grad, grad_tol)

    ref_kl = ops.fused_linear_kl(*as_fp32[:1], *as_fp32[1:], reduction="none", softcap=softcap, backend="torch")
    h32 = as_fp32[0].clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(ops.fused_linear_kl(h32, *as_fp32[1:], reduction="sum", softcap=softcap,
                                                          backend="torch"), h32)
    exact_kl, _, exact_grad, _ = kl_reference(*as_fp32, "highest", softcap)  # delta in full
    W = as_fp32[2].double()
    delta = (as_fp32[0] - as_fp32[1]).double()
    shift = BF16_NEAREST_UNIT * (delta.abs() @ W.abs()).max(-1).values  # the largest logit change per token
    raw = as_fp32[1].double() @ W + as_fp32[3].double()
    cap = (lambda z: z) if softcap is None else (lambda z: softcap * torch.tanh(z / softcap))
    p, q = torch.softmax(cap(raw), -1), torch.softmax(cap(raw + delta @ W), -1)
    kl_bound = shift * (q - p).abs().sum(-1) + 2 * shift**2 + 1e-4 * exact_kl
    grad_bound = 2 * (shift[:, None] + shift[:, None] ** 2) * (q @ W.abs().t()) + 1e-5 * exact_grad.abs().max()
    assert_within("kl vs the fp32-delta reference", kl, ref_kl.double(), kl_bound)
    assert_within("grad vs the fp32-delta reference", grad, ref_grad.double(), grad_bound)
    # not vacuous: the rounding moves the kernel off the reference by more than fp32 evaluation does
    assert ((kl.double() - ref_kl.double()).abs() > 1e-4 * exact_kl).any()
