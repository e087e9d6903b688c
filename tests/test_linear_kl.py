"""fused_linear_kl: the Triton kernel (interpreter on CPU, GPU where there is one) and the chunked
reference, both against torch.nn.functional.kl_div on materialized fp64 logits.

CPU shapes are small (Triton's interpreter is slow). On the interpreter tl.dot on bf16 is wrong,
so bf16 is only tested on a GPU.
"""


import pytest
import torch
import torch.nn.functional as F

import fastsae.ops.checks as checks
from fastsae import ops
from fastsae.kernels._logits import KLSums
from fastsae.ops.linear_kl import LinearKLReference
from conftest import HAS_TRITON, KERNEL_DEVICE

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

if HAS_TRITON:
    from fastsae.kernels import linear_kl as K

triton_backend = {"backend": "triton"}
# Small tiles on CPU so the shapes below span several vocabulary tiles, d steps and row blocks.
SMALL_TILES = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=4, num_stages=1)


def make_inputs(n_tokens, d, d_vocab, dtype=torch.float32, *, scale=1.0, noise=0.3, bias=True,
                device=KERNEL_DEVICE):
    gen = torch.Generator().manual_seed(n_tokens * 1000 + d_vocab)
    h_orig = torch.randn(n_tokens, d, generator=gen) * scale
    h_sae = h_orig + noise * scale * torch.randn(n_tokens, d, generator=gen)
    W_U = torch.randn(d, d_vocab, generator=gen) / d**0.5 * 3
    b_U = torch.randn(d_vocab, generator=gen) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h_sae).requires_grad_(), cast(h_orig), cast(W_U), cast(b_U)


def kl_div_per_token(h_sae, h_orig, W_U, b_U=None):
    """Ground truth: KL(p_orig || p_sae) per token from materialized fp64 logits, kl_div's way."""
    bias = 0 if b_U is None else b_U.double()
    log_q = F.log_softmax(h_sae.double() @ W_U.double() + bias, dim=-1)
    log_p = F.log_softmax(h_orig.double() @ W_U.double() + bias, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def reduce(kl, reduction, mask=None):
    if mask is not None:
        kl = torch.where(mask, kl, 0.0)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    return kl.sum() / (kl.numel() if mask is None else mask.sum().clamp_min(1))


def ground_truth(h_sae, h_orig, W_U, b_U, reduction="mean", mask=None, grad_output=None):
    h = h_sae.detach().double().requires_grad_()
    loss = reduce(kl_div_per_token(h, h_orig, W_U, b_U), reduction, mask)
    out = loss if grad_output is None else (loss * grad_output.double()).sum()
    (grad,) = torch.autograd.grad(out, h)
    return loss.detach(), grad


def tolerances(dtype):
    # fp16 inputs: exact products, fp32 sums; the gradient's (q - p) operand is fp16 on the
    # tensor cores (relative 2^-11 of max |q - p|).
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-4, rtol=2e-3)


def check(got_loss, got_grad, want_loss, want_grad, dtype):
    tol = tolerances(dtype)
    torch.testing.assert_close(got_loss.double().cpu(), want_loss.cpu(), **tol)
    scale = want_grad.abs().max().item()  # the gradient relative to its largest entry
    torch.testing.assert_close(got_grad.double().cpu() / scale, want_grad.cpu() / scale,
                               atol=tol["rtol"], rtol=0)


# ----------------------------------------------------------------------------------------------
# Kernel through the public op, and directly
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 48, 130), (37, 80, 300)], ids=["N1", "odd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_op_triton_matches_kl_div(dtype, shape, reduction):
    """d not a power of two, V not a multiple of the tile (64 on CPU), N = 1 and N % 16 != 0."""
    h_sae, h_orig, W_U, b_U = make_inputs(*shape, dtype)
    loss = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction=reduction, **triton_backend)
    assert loss.dtype == torch.float32
    grad_output = torch.rand(shape[0], device=KERNEL_DEVICE) if reduction == "none" else None
    (grad,) = torch.autograd.grad(loss if grad_output is None else (loss * grad_output).sum(), h_sae)
    assert grad.dtype == dtype
    want_loss, want_grad = ground_truth(h_sae, h_orig, W_U, b_U, reduction,
                                        grad_output=None if grad_output is None else grad_output.cpu())
    check(loss, grad, want_loss, want_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_slices", [1, 4])
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["one_sweep", "two_pass"])
def test_kernel_direct_tiles_slices_and_mask(dtype, n_slices, reduction):
    """Small tiles: several vocabulary tiles per slice, d in 16-wide steps, 3 row blocks; the
    slices merge (and the two-pass gradient's atomics) when n_slices > 1; a mask and no bias.
    "mean" runs the one-sweep kernel, "none" the forward and then the two-pass gradient kernel."""
    h_sae, h_orig, W_U, _ = make_inputs(40, 72, 203, dtype, bias=False)
    mask = torch.rand(40) > 0.3
    mask[16:32] = False  # a whole row block masked: the kernels skip it
    mask = mask.to(KERNEL_DEVICE)
    loss, sums = K.linear_kl_triton(h_sae, h_orig, W_U, None, mask, None, reduction, -100, config=SMALL_TILES,
                                    n_slices=n_slices)
    if reduction == "none":
        assert torch.all(loss[~mask] == 0)
        loss = loss.sum() / mask.sum()
    (grad,) = torch.autograd.grad(loss, h_sae)
    want_loss, want_grad = ground_truth(h_sae, h_orig, W_U, None, "mean", mask.cpu())
    check(loss, grad, want_loss, want_grad, dtype)
    assert torch.all(grad[~mask] == 0)
    assert KLSums(*sums).n_counted.item() == mask.sum().item()


@pytest.mark.parametrize("n_slices", [1, 3])
def test_stats_labels_and_top1(n_slices):
    h_sae, h_orig, W_U, b_U = make_inputs(2 * 19, 40, 150, noise=0.5)
    labels = torch.randint(0, 150, (2, 19))
    labels[:, -1] = -100
    labels[0, 3] = 149  # the last vocabulary column
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, :4] = False
    h_sae, h_orig = h_sae.reshape(2, 19, 40), h_orig.reshape(2, 19, 40)
    dev = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    # directly (small tiles: the label and the argmax land in different tiles and slices) ...
    _, sums = K.linear_kl_triton(h_sae.reshape(-1, 40), h_orig.reshape(-1, 40), W_U, b_U,
                                 dev(mask.reshape(-1)), dev(labels.reshape(-1)), "mean", -100,
                                 config=SMALL_TILES, n_slices=n_slices)
    sums = KLSums(*sums)
    direct = (sums.ce_orig / sums.n_labelled, sums.ce_sae / sums.n_labelled, sums.n_agree / sums.n_counted,
              sums.n_counted)
    # ... and through the op, which turns the sums into LinearKLStats
    _, stats = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, mask=dev(mask), labels=dev(labels),
                                   return_stats=True, **triton_backend)
    for got, want in zip(direct, stats):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    keep = mask & (labels != -100)
    logits = lambda h: (h.detach().double().cpu() @ W_U.double().cpu() + b_U.double().cpu())  # noqa: E731
    for got, h in ((stats.ce_orig, h_orig), (stats.ce_sae, h_sae)):
        torch.testing.assert_close(got.double().cpu(), F.cross_entropy(logits(h)[keep], labels[keep]),
                                   atol=1e-5, rtol=1e-5)
    agree = (logits(h_orig).argmax(-1) == logits(h_sae).argmax(-1))[mask].double().mean()
    torch.testing.assert_close(stats.top1_agreement.double().cpu(), agree)
    assert 0 < agree < 1  # both outcomes occur, so the test can fail
    assert stats.n_tokens.item() == mask.sum().item()
    _, ref_stats = ops.fused_linear_kl(h_sae.cpu(), h_orig.cpu(), W_U.cpu(), b_U.cpu(), mask=mask, labels=labels,
                                       return_stats=True, backend="torch")
    for got, want in zip(stats, ref_stats):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equal_hidden_states_give_exact_zero(dtype):
    h_sae, _, W_U, b_U = make_inputs(21, 40, 150, dtype)
    h_orig = h_sae.detach().clone()
    for n_slices in (1, 3):
        loss, _ = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, "sum", -100,
                                     config=SMALL_TILES, n_slices=n_slices)
        (grad,) = torch.autograd.grad(loss, h_sae)
        assert loss.item() == 0.0
        assert torch.all(grad == 0)
    per_token = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction="none", **triton_backend)
    assert torch.all(per_token == 0)


def test_extreme_logits_are_finite_and_right():
    """Logits up to +-1e4 (fp32): online max/rescaling must not overflow, and KL >= 0."""
    h_sae, h_orig, W_U, b_U = make_inputs(24, 32, 140, scale=1.0, noise=1.0)
    W_U = W_U * (1e4 / (h_orig @ W_U).abs().max())
    logits = h_orig @ W_U
    assert 5e3 < logits.abs().max() <= 1.01e4
    kl = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction="none", **triton_backend)
    (grad,) = torch.autograd.grad(kl.sum(), h_sae)
    want_kl, want_grad = ground_truth(h_sae, h_orig, W_U, b_U, "none", grad_output=torch.ones(24))
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert (kl >= 0).all()
    # The logits themselves carry fp32 rounding of ~1e4 * 2^-24 per entry.
    torch.testing.assert_close(kl.double().cpu(), want_kl, atol=2e-2, rtol=1e-4)
    torch.testing.assert_close(grad.double().cpu(), want_grad, atol=2e-3 * want_grad.abs().max().item(), rtol=0)


def test_strided_inputs():
    """W_U as a transposed view (tied embeddings: W_E.T) and h_sae as a column slice."""
    h_sae, h_orig, W_U, b_U = make_inputs(20, 40, 90)
    W_view = W_U.t().contiguous().t()
    h_wide = torch.cat([h_sae.detach(), h_sae.detach()], dim=1).requires_grad_()
    h_view = h_wide[:, :40]
    loss = ops.fused_linear_kl(h_view, h_orig, W_view, b_U, reduction="sum", **triton_backend)
    (grad,) = torch.autograd.grad(loss, h_wide)
    want_loss, want_grad = ground_truth(h_sae, h_orig, W_U, b_U, "sum")
    check(loss, grad[:, :40], want_loss, want_grad, torch.float32)
    assert torch.all(grad[:, 40:] == 0)


def test_kl_is_nonnegative_per_token():
    h_sae, h_orig, W_U, b_U = make_inputs(48, 32, 100, noise=0.02)  # tiny KLs, where rounding bites
    kl = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction="none", **triton_backend)
    assert (kl >= -1e-7).all()
    assert (kl > 0).any()


def test_triton_errors():
    h_sae, h_orig, W_U, b_U = make_inputs(4, 16, 40)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        ops.fused_linear_kl(h_sae.double(), h_orig.double(), W_U.double(), **triton_backend)
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.fused_linear_kl(h_sae.cpu(), h_orig.cpu(), W_U.cpu(), labels=torch.tensor([0, 1, 40, 2]))
    with pytest.raises(TypeError, match="has dtype"):
        ops.fused_linear_kl(h_sae, h_orig, W_U.half(), **triton_backend)
    with pytest.raises(ValueError, match="b_U must have shape"):
        ops.fused_linear_kl(h_sae, h_orig, W_U, torch.zeros(41, device=KERNEL_DEVICE), **triton_backend)
    with pytest.raises(TypeError, match="labels must be an int64"):
        ops.fused_linear_kl(h_sae, h_orig, W_U, labels=torch.zeros(4, device=KERNEL_DEVICE), **triton_backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_mask_and_labels", [False, True], ids=["plain", "mask+labels"])
def test_empty_batch_matches_reference(reduction, with_mask_and_labels):
    """N = 0: the reference's loss (0 for "mean" and "sum", an empty tensor for "none"), zero
    stats sums and an empty gradient, from the kernel entry point and from the op."""
    _, _, W_U, b_U = make_inputs(1, 24, 70)
    h_orig = torch.randn(0, 24, device=KERNEL_DEVICE)
    h_sae = h_orig.clone().requires_grad_()
    mask = torch.zeros(0, dtype=torch.bool, device=KERNEL_DEVICE) if with_mask_and_labels else None
    labels = torch.zeros(0, dtype=torch.int64, device=KERNEL_DEVICE) if with_mask_and_labels else None
    loss, sums = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, mask, labels, reduction, -100)
    ref_h = h_orig.clone().requires_grad_()
    ref_loss, ref_stats = ops.fused_linear_kl(ref_h, h_orig, W_U, b_U, mask=mask, labels=labels,
                                              reduction=reduction, return_stats=True, backend="torch")
    assert loss.shape == ref_loss.shape and loss.dtype == ref_loss.dtype
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert torch.equal(sums, KLSums.zeros(KERNEL_DEVICE))
    (grad,) = torch.autograd.grad(loss.sum(), h_sae)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), ref_h)
    assert grad.shape == ref_grad.shape == (0, 24) and grad.dtype == ref_grad.dtype
    _, stats = ops.fused_linear_kl(h_sae.view(2, 0, 24), h_orig.view(2, 0, 24), W_U, b_U, return_stats=True,
                                   reduction=reduction, **triton_backend)
    assert stats.n_tokens.item() == 0 and stats.top1_agreement.item() == 0


def test_vocab_slices_of_empty_batch_on_a_gpu():
    """The GPU branch of the slicing heuristic with no row blocks (no GPU needed: meta tensors
    under recorded_launches configure as on a 132-SM GPU): it divided by the number of row blocks."""
    from compile_cases import recorded_launches

    meta = torch.device("meta")
    with recorded_launches(90, 132):
        assert K._vocab_slices(0, 393, meta, None) == (2, 197)  # as for one row block
        assert K._vocab_slices(1, 393, meta, None) == (2, 197)
        assert K._vocab_slices(64, 393, meta, None) == (79, 5)


def test_far_apart_rows_and_columns():
    """h rows and W_U columns FAR = 2^31 - 4096 elements apart (row * stride_hn and
    column * stride_wv pass 2^31 from index 2): int64 offsets read the right data. One 8 GiB fp16
    storage that torch.empty only reserves; a few pages get touched."""
    far, n_tokens, d, d_vocab = 2**31 - 4096, 3, 16, 3
    storage = torch.empty(8192 + 2 * far + 3 * d, dtype=torch.float16, device=KERNEL_DEVICE)
    storage[:8192 + 3 * d].zero_()
    h_orig = storage.as_strided((n_tokens, d), (far, 1), 8192)
    h_sae = storage.as_strided((n_tokens, d), (far, 1), 8192 + d)  # same strides, interleaved
    W_U = storage.as_strided((d, d_vocab), (1, far), 8192 + 2 * d)  # column-major
    gen = torch.Generator().manual_seed(0)
    for view, scale in ((h_orig, 1.0), (h_sae, 1.0), (W_U, d ** -0.5 * 3)):
        view.copy_((torch.randn(view.shape, generator=gen) * scale).to(view))
    h_sae.requires_grad_()
    loss = ops.fused_linear_kl(h_sae, h_orig, W_U, reduction="sum", **triton_backend)
    (grad,) = torch.autograd.grad(loss, h_sae)
    want_loss, want_grad = ground_truth(*(t.detach().contiguous() for t in (h_sae, h_orig, W_U)), None, "sum")
    check(loss, grad, want_loss, want_grad, torch.float16)


# ----------------------------------------------------------------------------------------------
# Numerics: a large common bias, masked NaN tokens, soft-capping, the gradient filter, padding
# ----------------------------------------------------------------------------------------------

BACKENDS = [pytest.param("triton", id="kernel"), pytest.param("torch", id="reference")]


def capped_kl_truth(h_sae, h_orig, W_U, b_U, softcap, labels=None):
    """fp64 ground truth from materialized logits, capped as the model does: (KL per token, its
    gradient for a sum, CE of both runs over the labelled tokens)."""
    h = h_sae.detach().double().cpu().requires_grad_()
    bias = 0 if b_U is None else b_U.double().cpu()

    def logits(x):
        z = x @ W_U.double().cpu() + bias
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    log_q, log_p = F.log_softmax(logits(h), -1), F.log_softmax(logits(h_orig.double().cpu()), -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    (grad,) = torch.autograd.grad(kl.sum(), h)
    ce = None
    if labels is not None:
        keep = labels != -100
        ce = (F.nll_loss(log_p[keep], labels[keep]), F.nll_loss(log_q.detach()[keep], labels[keep]))
    return kl.detach(), grad, ce


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_common_bias_keeps_the_kl_exact(backend):
    """b_U += 1e4 (fp32): the logits are 1e4 large, their difference O(1). KL relative error below
    1e-5 per token (it was 1e-4 to 3.5e-3 before the delta form), gradient to 1e-5 of its largest."""
    h_sae, h_orig, W_U, b_U = make_inputs(37, 48, 203, noise=0.3)
    b_U = b_U + 1e4
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    args = [t.detach().to(device) for t in (h_sae, h_orig, W_U, b_U)]
    args[0].requires_grad_()
    kl = ops.fused_linear_kl(*args, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(kl.sum(), args[0])
    want_kl, want_grad, _ = capped_kl_truth(h_sae, h_orig, W_U, b_U, None)
    assert want_kl.min() > 1e-2  # KLs large enough that a relative error means something
    relative = ((kl.double().cpu() - want_kl).abs() / want_kl).max().item()
    assert relative < 1e-5, relative
    scale = want_grad.abs().max()
    torch.testing.assert_close(grad.double().cpu() / scale, want_grad / scale, atol=1e-5, rtol=0)


def two_lse_kl_fp32(h_sae, h_orig, W_U, b_U, softcap=None):
    """The paper's form in fp32: KL = lse(B) - lse(A) - E_p[B - A] from materialised logits (what
    loses its relative precision when the KL is small)."""
    def logits(h):
        z = h.detach().float().cpu() @ W_U.float().cpu() + (0 if b_U is None else b_U.float().cpu())
        return z if softcap is None else softcap * torch.tanh(z / softcap)
    a, b = logits(h_orig), logits(h_sae)
    return torch.logsumexp(b, -1) - torch.logsumexp(a, -1) - (torch.softmax(a, -1) * (b - a)).sum(-1)


SMALL_KL_CASES = {
    # (noise, softcap, offset, bias_ramp): KL about 5e-5 nats per token in each
    "plain": (3.5e-3, None, 0.0, False),
    "softcap": (3.5e-3, 4.0, 0.0, False),
    # h_sae moves every logit by +5 (a constant shift, which the KL ignores) besides the small
    # change: D is 500 times the change the KL sees (exp(D) without a centre would cancel by
    # e^5 / 5e-5; fp32 rounds D itself to 5 * 2^-24, which caps the offset a 1e-4 test can use)
    "large_common_delta": (3.5e-3, None, 5.0, False),
    # the clean logits rise across the vocabulary, so the running maximum moves on every tile
    "rising_max": (3.5e-3, None, 0.0, True),
}


def small_kl_inputs(noise, offset, bias_ramp):
    """N = 17, d = 40, V = 301 as in the issue, h_sae = h_orig + noise; W_U's last row is all
    ones, so a shift of h along it adds `offset` to every logit."""
    h_sae, h_orig, W_U, b_U = make_inputs(17, 40, 301, noise=noise)
    W_U[-1] = 1.0
    h_sae = h_sae.detach().clone()
    h_sae[:, -1] += offset
    if bias_ramp:
        b_U = b_U + torch.linspace(-20.0, 20.0, 301)
    return h_sae.requires_grad_(), h_orig, W_U, b_U


@pytest.mark.parametrize("case", list(SMALL_KL_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_kl_keeps_its_relative_precision(backend, case):
    """KL about 5e-5 per token (a good SAE): fp32 relative error <= 1e-4 per token against fp64,
    where the difference of two log-sum-exps (the paper's form, in fp32) is off by far more. The
    kernel with small tiles and 3 vocabulary slices, so the online rescaling and the merge act."""
    noise, softcap, offset, bias_ramp = SMALL_KL_CASES[case]
    h_sae, h_orig, W_U, b_U = small_kl_inputs(noise, offset, bias_ramp)
    want_kl, want_grad, _ = capped_kl_truth(h_sae, h_orig, W_U, b_U, softcap)
    assert 1e-5 < want_kl.mean() < 2e-4, want_kl.mean()
    if softcap is not None:  # the cap bites: logits reach past the cap
        assert (h_orig @ W_U + b_U).abs().max() > 2 * softcap
    if backend == "triton":
        kl, _ = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, "none", -100, softcap,
                                   config=SMALL_TILES, n_slices=3)
        loss, _ = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, "sum", -100, softcap,
                                     config=SMALL_TILES, n_slices=3)
    else:
        kl = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction="none", softcap=softcap, backend="torch")
        loss = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction="sum", softcap=softcap, backend="torch")
    relative = ((kl.double().cpu() - want_kl).abs() / want_kl).max().item()
    assert relative <= 1e-4, relative
    assert abs(loss.item() - want_kl.sum().item()) <= 1e-4 * want_kl.sum().item()
    (grad,) = torch.autograd.grad(loss, h_sae)  # the one-sweep gradient (kernel) for a sum
    scale = want_grad.abs().max()
    # With the offset, fp32 rounds each D to 5 * 2^-24 = 3e-7, against the 1e-2 changes the
    # gradient (q - p) follows: 3e-5 of it per entry, in the inputs, whatever the algorithm.
    grad_atol = 1e-4 if offset else 1e-5
    torch.testing.assert_close(grad.double().cpu() / scale, want_grad / scale, atol=grad_atol, rtol=0)
    # the test can fail: the two-log-sum-exp form in fp32 is far off here
    naive = ((two_lse_kl_fp32(h_sae, h_orig, W_U, b_U, softcap).double() - want_kl).abs() / want_kl).max()
    assert naive > 1e-3, naive


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_kl_with_huge_deltas_and_logits(backend):
    """D up to about 1e3 (h_sae far from h_orig) on logits up to 1e3 with a +1e4 bias: finite, and
    fp32-relative right (the stable form's other branch, log1p(u) - E_p[x], and exp(B - max B)
    in place of exp(x))."""
    h_sae, h_orig, W_U, b_U = make_inputs(19, 32, 203, noise=3.0)
    W_U = W_U * (1e3 / (h_orig @ W_U).abs().max())
    b_U = b_U + 1e4
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    args = [t.detach().to(device) for t in (h_sae, h_orig, W_U, b_U)]
    args[0].requires_grad_()
    if backend == "triton":
        kl, _ = K.linear_kl_triton(*args, None, None, "none", -100, config=SMALL_TILES, n_slices=2)
        loss, _ = K.linear_kl_triton(*args, None, None, "sum", -100, config=SMALL_TILES, n_slices=2)
    else:
        kl = ops.fused_linear_kl(*args, reduction="none", backend=backend)
        loss = ops.fused_linear_kl(*args, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, args[0])
    want_kl, want_grad, _ = capped_kl_truth(h_sae, h_orig, W_U, b_U, None)
    delta = (h_sae - h_orig).detach() @ W_U
    assert delta.abs().max() > 300 and want_kl.min() > 10  # the regime this test is about
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    # the logits carry fp32 rounding of 1e3 * 2^-24 each; the KL is hundreds of nats
    torch.testing.assert_close(kl.double().cpu(), want_kl, rtol=1e-5, atol=0)
    scale = want_grad.abs().max()
    torch.testing.assert_close(grad.double().cpu() / scale, want_grad / scale, atol=1e-5, rtol=0)


def test_reference_gradcheck_in_float64():
    """The reference's gradient (in float64) against finite differences, for the scalar (computed
    in forward) and per-token (recomputed in backward) paths, with a cap and a mask."""
    gen = torch.Generator().manual_seed(7)
    h_orig = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    h_sae = (h_orig + 0.1 * torch.randn(5, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    W_U = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 2
    b_U = torch.randn(11, generator=gen, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True])
    for reduction in ("mean", "none"):
        for softcap in (None, 3.0):
            def f(h, reduction=reduction, softcap=softcap):
                return ops.fused_linear_kl(h, h_orig, W_U, b_U, mask=mask, reduction=reduction, softcap=softcap,
                                           backend="torch")
            assert torch.autograd.gradcheck(f, (h_sae,))


# capped, the -1e30 floor overflows inside tanh's exp (numpy warns under the interpreter): tanh -> -1, as meant
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_masked_vocabulary_and_strided_bias(backend, softcap):
    """b_U = -inf over whole vocabulary tiles (a masked vocabulary; the interpreter's tiles are 16
    to 64 wide) and b_U a strided view: the same KL and gradient as the materialised logits."""
    h_sae, h_orig, W_U, b_U = make_inputs(24, 32, 150)
    b_U = torch.randn(2 * 150, generator=torch.Generator().manual_seed(5))[::2]  # stride 2
    b_U[:70] = float("-inf")
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    args = [t.detach().to(device) for t in (h_sae, h_orig, W_U, b_U)]
    assert args[3].stride(0) == 2 or device != "cpu"
    args[0].requires_grad_()
    kl = ops.fused_linear_kl(*args, reduction="none", softcap=softcap, backend=backend)
    (grad,) = torch.autograd.grad(kl.sum(), args[0])
    # uncapped, the masked entries have probability 0 in both runs: the truth is the KL over the rest
    # (materialised, -inf - -inf would make it NaN); capped, they are finite logits -softcap
    keep = slice(70 if softcap is None else 0, None)
    want_kl, want_grad, _ = capped_kl_truth(h_sae, h_orig, W_U[:, keep], b_U[keep], softcap)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(kl.double().cpu(), want_kl, rtol=1e-4, atol=1e-6)
    scale = want_grad.abs().max()
    torch.testing.assert_close(grad.double().cpu() / scale, want_grad / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_slices", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["one_sweep", "two_pass"])
def test_masked_nan_tokens_are_never_read(backend, n_slices, reduction):
    """A masked token whose hidden states are NaN (and +-inf): finite loss, stats and gradient, the
    same as without those tokens; no argmax over an all-NaN row (it raises in the interpreter)."""
    if backend == "torch" and (n_slices > 1 or reduction == "none"):
        pytest.skip("slices are a kernel option; the reference's 'none' is tested elsewhere")
    h_sae, h_orig, W_U, b_U = make_inputs(40, 32, 150)
    mask = torch.rand(40, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[[0, 17, 39]] = False
    labels = torch.randint(0, 150, (40,))
    h_bad, h_orig_bad = h_sae.detach().clone(), h_orig.clone()
    h_bad[~mask] = float("nan")
    h_orig_bad[~mask] = float("nan")
    h_bad[0, 0] = float("inf")
    h_orig_bad[17, 3] = float("-inf")
    h_bad.requires_grad_()
    dev = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    if backend == "triton":
        loss, sums = K.linear_kl_triton(h_bad, h_orig_bad, W_U, b_U, dev(mask), dev(labels), reduction, -100,
                                        config=SMALL_TILES, n_slices=n_slices)
        if reduction == "none":
            loss = loss.sum() / mask.sum()
    else:
        loss, sums = LinearKLReference.apply(h_bad, h_orig_bad, W_U, b_U, dev(mask), dev(labels),
                                                           "mean", -100, None)
    (grad,) = torch.autograd.grad(loss, h_bad)
    assert torch.isfinite(loss) and torch.isfinite(sums).all() and torch.isfinite(grad).all()
    assert torch.all(grad[~mask] == 0)
    keep = mask.nonzero().squeeze(1)
    want_loss, want_grad = ground_truth(h_sae[keep], h_orig[keep], W_U, b_U, "mean")
    check(loss, grad[keep], want_loss, want_grad, torch.float32)
    _, _, (ce_orig, ce_sae) = capped_kl_truth(h_sae[keep], h_orig[keep], W_U, b_U, None, labels[keep])
    sums = KLSums(*sums)
    torch.testing.assert_close(sums.ce_orig.double().cpu() / sums.n_labelled.cpu(), ce_orig, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums.ce_sae.double().cpu() / sums.n_labelled.cpu(), ce_sae, atol=1e-5, rtol=1e-5)
    assert KLSums(*sums).n_counted.item() == mask.sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap", [30.0, 4.0])
@pytest.mark.parametrize("n_slices", [1, 3])
def test_softcap_kernel_matches_capped_logits(dtype, softcap, n_slices):
    """Final-logit soft-capping in the kernel: loss, gradient and CE of both runs against fp64
    materialized logits capped as Gemma-2 does, with logits up to about 3 * softcap (deep in the
    cap's saturation) and small differences between the runs."""
    h_sae, h_orig, W_U, b_U = make_inputs(37, 48, 203, dtype, noise=0.05)
    W_U = (W_U.float() * (3 * softcap / (h_orig.float() @ W_U.float()).abs().max())).to(dtype)
    labels = torch.randint(0, 203, (37,))
    labels[-1] = -100
    loss, sums = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, None, labels.to(KERNEL_DEVICE), "sum", -100, softcap,
                                    config=SMALL_TILES, n_slices=n_slices)
    (grad,) = torch.autograd.grad(loss, h_sae)
    want_kl, want_grad, (ce_orig, ce_sae) = capped_kl_truth(h_sae, h_orig, W_U, b_U, softcap, labels)
    check(loss, grad, want_kl.sum(), want_grad, dtype)
    sums = KLSums(*sums)
    for got, want in ((sums.ce_orig / sums.n_labelled, ce_orig), (sums.ce_sae / sums.n_labelled, ce_sae)):
        torch.testing.assert_close(got.double().cpu(), want, **tolerances(dtype))
    # The cap changes the result (so this test can fail): the uncapped KL is far from it.
    uncapped, _, _ = capped_kl_truth(h_sae, h_orig, W_U, b_U, None)
    assert abs(uncapped.sum() - want_kl.sum()) > 0.1 * want_kl.sum()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_through_the_op_both_backends(reduction):
    """fused_linear_kl(softcap=...) on the kernel (interpreter) and the chunked reference (many
    chunks), with a mask, against fp64 capped logits; equal hidden states still give exactly 0."""
    h_sae, h_orig, W_U, b_U = make_inputs(30, 40, 150, noise=0.2)
    W_U = W_U * (60 / (h_orig @ W_U).abs().max())
    mask = torch.arange(30) % 4 != 1
    grad_output = torch.rand(30)
    h = h_sae.detach().double().requires_grad_()
    z = lambda x: 30.0 * torch.tanh((x @ W_U.double() + b_U.double()) / 30.0)  # noqa: E731
    kl_rows = F.kl_div(F.log_softmax(z(h), -1), F.log_softmax(z(h_orig.double()), -1), log_target=True,
                       reduction="none").sum(-1)
    want = reduce(kl_rows, reduction, mask)
    (want_grad,) = torch.autograd.grad(want if reduction != "none" else (want * grad_output.double()).sum(), h)
    want = want.detach()
    for backend in ("triton", "torch"):
        loss = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, mask=mask, reduction=reduction, softcap=30.0,
                                   backend=backend)
        (grad,) = torch.autograd.grad(loss if reduction != "none" else (loss * grad_output).sum(), h_sae)
        check(loss, grad, want, want_grad, torch.float32)
        same = ops.fused_linear_kl(h_sae, h_sae.detach(), W_U, b_U, softcap=30.0, backend=backend)
        assert same.item() == 0.0 and torch.all(torch.autograd.grad(same, h_sae)[0] == 0)
    with pytest.raises(ValueError, match="softcap must be None or a positive finite number"):
        ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, softcap=0.0)


def test_gradient_filter_error_is_within_its_bound():
    """Cut Cross-Entropy's filter: groups of vocabulary tiles whose |q - p| is below filter_eps
    everywhere are skipped; the gradient then differs from the exact one by at most
    token_weight * filter_eps * ||W_U[k, :]||_1 per element (module docstring), and 0 disables it."""
    h_sae, h_orig, W_U, b_U = make_inputs(40, 32, 600, noise=0.2)
    b_U[200:] -= 12  # tokens the model rules out: their tiles carry almost no probability
    tiles = dict(SMALL_TILES, V_GROUP=1)
    grads = {}
    for eps in (0.0, 1e-4):
        loss, _ = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, None, None, "mean", -100, filter_eps=eps,
                                     config=tiles, n_slices=2)
        (grads[eps],) = torch.autograd.grad(loss, h_sae)
    _, want_grad = ground_truth(h_sae, h_orig, W_U, b_U, "mean")
    scale = want_grad.abs().max()
    torch.testing.assert_close(grads[0.0].double() / scale, want_grad / scale, atol=1e-5, rtol=0)
    error = (grads[1e-4] - grads[0.0]).abs()
    bound = (1 / 40) * 1e-4 * W_U.abs().sum(1)  # [d]: the same for every token (weight 1/N)
    assert error.max() > 0  # tiles were skipped: the filter acted
    assert torch.all(error <= bound[None, :] + 1e-7)


def test_padded_unembedding_copies_misaligned_rows():
    """A row-major W_U with V % 16 != 0 is copied into 16-element-aligned rows whose padding is zero
    (the kernels may load it: loadable_columns); aligned and column-major W_U pass through."""
    W_U = torch.randn(24, 203, device=KERNEL_DEVICE)
    padded = K.padded_unembedding(W_U)
    assert padded.stride() == (208, 1) and torch.equal(padded, W_U)
    assert K.loadable_columns(padded) == 208 and K.loadable_columns(W_U) == 203
    assert torch.all(padded.as_strided((24, 208), (208, 1))[:, 203:] == 0)
    aligned = torch.randn(24, 208, device=KERNEL_DEVICE)
    assert K.padded_unembedding(aligned) is aligned
    tied = torch.randn(203, 24, device=KERNEL_DEVICE).t()  # W_E.T: column-major, contiguous along d
    assert K.padded_unembedding(tied) is tied


@pytest.mark.parametrize("write", ["data", "storage_alias", "in_place", "new_tensor"])
def test_the_kernel_never_reads_a_stale_unembedding(write):
    """After any write to W_U, the Triton path's loss is the new W_U's (it was served a cached
    padded copy keyed on the version counter, which a write through W_U.data leaves alone: 0.179
    where the reference gave 0.558)."""
    h_sae, h_orig, W_U, b_U = make_inputs(8, 16, 203)
    W_U = W_U.detach().clone()
    before = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, backend="triton")
    if write == "data":
        W_U.data.mul_(2.0)
    elif write == "storage_alias":
        torch.Tensor().set_(W_U.untyped_storage(), 0, W_U.shape, W_U.stride()).mul_(2.0)
    elif write == "in_place":
        W_U.mul_(2.0)
    else:
        W_U = W_U * 2.0
    after = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, backend="triton")
    want = ops.fused_linear_kl(h_sae.detach().cpu(), h_orig.cpu(), W_U.cpu(), b_U.cpu(), backend="torch")
    assert not torch.allclose(before.cpu(), want)  # the write changed the loss
    torch.testing.assert_close(after.detach().cpu(), want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The chunked reference (the spec) against kl_div
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 700])  # one chunk / many chunks of 7 rows
def test_reference_matches_kl_div(monkeypatch, reduction, chunk_elements):
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", chunk_elements)
    h_sae, h_orig, W_U, b_U = make_inputs(45, 24, 75, device="cpu")
    mask = torch.rand(45) > 0.25
    loss = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, mask=mask, reduction=reduction, backend="torch")
    grad_output = torch.rand(45) if reduction == "none" else None
    (grad,) = torch.autograd.grad(loss if grad_output is None else (loss * grad_output).sum(), h_sae)
    want_loss, want_grad = ground_truth(h_sae, h_orig, W_U, b_U, reduction, mask, grad_output)
    check(loss, grad, want_loss, want_grad, torch.float32)
    # the paper's form: kl_div(log q, log p, log_target=True, reduction="batchmean") over kept tokens
    if reduction == "mean":
        log_q = F.log_softmax(h_sae[mask].double() @ W_U.double() + b_U.double(), -1)
        log_p = F.log_softmax(h_orig[mask].double() @ W_U.double() + b_U.double(), -1)
        batchmean = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        torch.testing.assert_close(loss.double(), batchmean, atol=1e-6, rtol=1e-5)


def test_reference_extreme_logits_and_exact_zero():
    h_sae, h_orig, W_U, b_U = make_inputs(16, 32, 90, noise=1.0, device="cpu")
    W_U = W_U * (1e4 / (h_orig @ W_U).abs().max())
    kl = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction="none", backend="torch")
    torch.testing.assert_close(kl.double(), kl_div_per_token(h_sae, h_orig, W_U, b_U), atol=2e-2, rtol=1e-4)
    assert (kl >= 0).all()
    loss = ops.fused_linear_kl(h_sae, h_sae.detach().clone(), W_U, b_U, backend="torch")
    assert loss.item() == 0.0 and torch.all(torch.autograd.grad(loss, h_sae)[0] == 0)


# ----------------------------------------------------------------------------------------------
# Measured dispatch (fastsae/ops/_backend.py): a faked GPU and a record of the test's own
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """fused_linear_kl's "auto" dispatch as on a GPU named "Fake GPU" whose record is a temporary
    file (the kernel runs under the interpreter). Yields (record path, the variants that ran)."""
    import fastsae.ops.linear_kl as op_module
    from fastsae.ops import _backend

    record = tmp_path / "measured_dispatch.json"
    monkeypatch.setattr(_backend, "MEASURED_DISPATCH", record)
    monkeypatch.setattr(op_module, "use_triton",
                        lambda op, kernels, *tensors, backend=None: _backend.requested_backend(backend) != "torch")
    monkeypatch.setattr(op_module, "device_name", lambda tensor: "Fake GPU")
    ran = []
    call_kernel, reference = op_module.call_kernel, LinearKLReference.apply

    def kernel(entry, *args):
        ran.append("fused" if args[-1] else "two_pass")  # fused: one sweep, or loss only without a gradient
        return call_kernel(entry, *args)

    def traced_reference(*args):
        ran.append("reference")
        return reference(*args)

    monkeypatch.setattr(op_module, "call_kernel", kernel)
    monkeypatch.setattr(LinearKLReference, "apply", traced_reference)
    return record, ran


def test_measured_dispatch_takes_the_recorded_fastest(fake_gpu):
    """No record: the fused kernel (one sweep with a gradient). A record for this GPU and shape
    class: its fastest variant among those that can run (reduction="none" has no one-sweep form;
    no gradient: loss-only kernel or reference), from the entry nearest in token count. A forced
    backend or another GPU ignores it."""
    from fastsae.ops._backend import measured_fastest, record_measurement
    from fastsae.ops.linear_kl import VARIANTS_WITH_GRAD, shape_class

    record, ran = fake_gpu
    h_sae, h_orig, W_U, b_U = make_inputs(20, 16, 50)

    def variant(reduction="mean", grad=True, **kwargs):
        ran.clear()
        h = h_sae.detach().clone().requires_grad_(grad)
        loss = ops.fused_linear_kl(h, h_orig, W_U, b_U, reduction=reduction, **kwargs)
        if grad:
            torch.autograd.grad(loss.sum(), h)
        return ran[0]

    def measured(n_tokens, with_grad=True, **seconds):
        record_measurement("fused_linear_kl", "Fake GPU", shape_class(torch.float32, 16, 50, with_grad), n_tokens,
                           seconds, path=record)

    assert variant() == "fused" and variant("none") == "two_pass" and variant(grad=False) == "fused"
    measured(20, one_sweep=2.0, two_pass=3.0, reference=1.0)
    assert variant() == "reference"
    assert variant(backend="triton") == "fused" and variant(backend="torch") == "reference"
    measured(20, one_sweep=2.0, two_pass=1.0, reference=3.0)  # replaces the entry at N = 20
    assert variant() == "two_pass"
    measured(20, one_sweep=1.0, two_pass=3.0, reference=2.0)
    assert variant() == "fused" and variant("none") == "reference"  # none: two_pass or reference
    measured(16384, one_sweep=2.0, two_pass=3.0, reference=1.0)  # another token count
    assert variant() == "fused"  # N = 20 is nearest to the entry at 20
    cls = shape_class(torch.float32, 16, 50, True)
    assert measured_fastest("fused_linear_kl", "Fake GPU", cls, 9000, VARIANTS_WITH_GRAD, path=record) == "reference"
    assert measured_fastest("fused_linear_kl", "Other GPU", cls, 20, VARIANTS_WITH_GRAD, path=record) is None
    measured(20, with_grad=False, forward=2.0, reference=1.0)  # loss only: its own shape class
    assert variant(grad=False) == "reference" and variant() == "fused"
    torch.set_float32_matmul_precision("high")  # another fp32 shape class: no record
    try:
        assert variant() == "fused"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert shape_class(torch.bfloat16, 768, 50257, True) == "bf16/d768/V50257/fwd_bwd"


@pytest.mark.slow
def test_gpu_check_records_the_kl_dispatch(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py's kl_dispatch worker at its smoke size (interpreter): every variant
    timed per shape class, the fastest recorded where the op's dispatch reads it."""
    import sys
    from pathlib import Path

    from fastsae.ops._backend import measured_fastest

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    monkeypatch.delitem(sys.modules, "gpu_check", raising=False)
    import gpu_check

    record = tmp_path / "record.json"
    result = gpu_check.kl_dispatch_worker(smoke=True, deadline=float("inf"), record_path=record)
    assert result["status"] == "ok" and len(result["measurements"]) == 2
    for entry in result["measurements"]:
        assert set(entry["seconds"]) == ({"one_sweep", "two_pass", "reference"} if entry["shape_class"].endswith(
            "fwd_bwd") else {"forward", "reference"})
        got = measured_fastest("fused_linear_kl", result["device"], entry["shape_class"], entry["N"],
                               entry["seconds"], path=record)
        assert got == entry["fastest"]


def test_one_sweep_and_two_pass_agree():
    """The two fused paths of a scalar reduction give the same loss, stats and gradient."""
    h_sae, h_orig, W_U, b_U = make_inputs(21, 24, 100)
    labels = torch.randint(0, 100, (21,), device=KERNEL_DEVICE)
    results = []
    for one_sweep in (True, False):
        loss, sums = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, None, labels, "mean", -100, None, one_sweep,
                                        config=SMALL_TILES, n_slices=2)
        results.append((loss, sums, torch.autograd.grad(loss, h_sae)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_gpt2_shapes(dtype):
    """V = 50,257, d = 768: against the fp32 reference on the same (rounded) inputs."""
    h_sae, h_orig, W_U, b_U = make_inputs(1000, 768, 50257, dtype, device="cuda")
    labels = torch.randint(0, 50257, (1000,), device="cuda")
    for reduction in ("mean", "none"):  # the one-sweep kernel; the forward and two-pass gradient
        loss, sums = K.linear_kl_triton(h_sae, h_orig, W_U, b_U, None, labels, reduction, -100)
        loss = loss if reduction == "mean" else loss.mean()
        (grad,) = torch.autograd.grad(loss, h_sae)
        ref_h = h_sae.detach().float().requires_grad_()
        ref_loss, ref_sums = ops.fused_linear_kl(ref_h, h_orig.float(), W_U.float(), b_U.float(), backend="torch",
                                                 labels=labels, return_stats=True)
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_h)
        rtol = 1e-3 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=rtol)
        scale = ref_grad.abs().max()
        torch.testing.assert_close(grad.float() / scale, ref_grad / scale, atol=rtol, rtol=0)
        sums = KLSums(*sums)
        torch.testing.assert_close(torch.stack([sums.ce_orig, sums.ce_sae, sums.n_labelled]),
                                   torch.stack([ref_sums.ce_orig * 1000, ref_sums.ce_sae * 1000,
                                                torch.tensor(1000.0, device="cuda")]), rtol=1e-3, atol=1e-2)
    h_same = h_orig.clone().requires_grad_()
    loss = ops.fused_linear_kl(h_same, h_orig, W_U, b_U)
    assert loss.item() == 0.0 and torch.all(torch.autograd.grad(loss, h_same)[0] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("d_model, d_vocab", [(4096, 128256), (1024, 256000)])
def test_gpu_large_vocab_and_width(d_model, d_vocab):
    h_sae, h_orig, W_U, _ = make_inputs(300, d_model, d_vocab, torch.bfloat16, device="cuda", bias=False)
    kl = ops.fused_linear_kl(h_sae, h_orig, W_U, reduction="none")
    (grad,) = torch.autograd.grad(kl.sum(), h_sae)
    ref_h = h_sae.detach().float().requires_grad_()
    ref = ops.fused_linear_kl(ref_h, h_orig.float(), W_U.float(), reduction="none", backend="torch")
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_h)
    torch.testing.assert_close(kl, ref, atol=1e-4, rtol=1e-2)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(grad.float() / scale, ref_grad / scale, atol=1e-2, rtol=0)


# ----------------------------------------------------------------------------------------------
# Soft-capping through the model and the trainer: a tiny Gemma-2 (final_logit_softcapping = 30)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A random-weight Gemma2ForCausalLM + tokenizer saved to a directory (loads offline through the
    TransformerLens bridge). The final norm is scaled so that the logits reach about +-50, where
    the cap (30) changes them a lot, as in real Gemma-2 models."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from helpers_models import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          sliding_window=16, final_logit_softcapping=30.0, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(100.0)  # Gemma's RMSNorm scales by (1 + weight)
    path = tmp_path_factory.mktemp("tiny_gemma2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_gemma2_kl_and_ce_through_the_trainer_equal_the_models_own(gemma2_dir, tmp_path):
    """LanguageModel reads the cap (30) and passes its load check; the Trainer's eval KL and CE
    (logit-free, capped inside the fused op) equal those from the model's own logits (relative 1e-4)."""
    from fastsae.model.lm import LanguageModel
    from fastsae.train import Trainer, load_config

    lm = LanguageModel.load(str(gemma2_dir))
    assert lm.logit_softcap == 30.0
    lm.check_logit_free_path()
    batch, ctx, hook = 4, 16, "blocks.1.hook_resid_pre"
    tokens = torch.randint(0, 250, (batch, ctx), generator=torch.Generator().manual_seed(1))
    cfg = load_config({}, [f"model.name={gemma2_dir}", f"saes.hooks=[{hook}]", "saes.n_latents=64",
                           f"optim.batch_size={batch}", f"data.context_length={ctx}", f"eval.batch_size={batch}",
                           f"optim.n_tokens={batch * ctx}", "log.progress=false", f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, model=lm, eval_dataset=[tokens])
    metrics = trainer.evaluate(n_tokens=batch * ctx, write=False)

    sae = trainer.saes[hook]
    with torch.no_grad():
        clean = lm.logits(tokens).double()
        spliced = lm.logits(tokens, {hook: lambda acts: sae(acts.to(sae.dtype)).to(acts.dtype)}).double()
    uncapped_scale = (clean.abs().max() / 30).item()
    assert uncapped_scale > 0.9  # the cap bites: logits up to about 30 (raw ones beyond)
    log_p, log_q = F.log_softmax(clean, -1).flatten(0, 1), F.log_softmax(spliced, -1).flatten(0, 1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    labels = tokens[:, 1:].reshape(-1)
    ce_orig = F.nll_loss(F.log_softmax(clean[:, :-1], -1).flatten(0, 1), labels)
    ce_sae = F.nll_loss(F.log_softmax(spliced[:, :-1], -1).flatten(0, 1), labels)
    assert kl > 1e-3  # the random SAE changes the output: the comparison means something
    for name, want in (("kl", kl), ("ce_orig", ce_orig), ("ce_sae", ce_sae)):
        assert metrics[f"eval/{name}"] == pytest.approx(want.item(), rel=1e-4), name


def test_a_model_the_logit_free_path_cannot_reproduce_is_refused(gemma2_dir, tmp_path, monkeypatch):
    """Without its cap the logit-free path disagrees with the Gemma-2 model's logits: the load
    check refuses it, naming the difference, and so does the Trainer."""
    from fastsae.model.lm import LanguageModel
    from fastsae.train import Trainer, load_config

    lm = LanguageModel.load(str(gemma2_dir))
    monkeypatch.setattr(LanguageModel, "logit_softcap", property(lambda self: None))
    with pytest.raises(ValueError, match="does not reproduce this model's logits"):
        lm.check_logit_free_path()
    cfg = load_config({}, [f"model.name={gemma2_dir}", "saes.hooks=[blocks.1.hook_resid_pre]", "saes.n_latents=64",
                           "log.progress=false", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="does not reproduce this model's logits"):
        Trainer(cfg, model=lm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_softcap_and_large_bias(dtype):
    """GPU (bf16 dots, TF32): Gemma-2's cap at V = 256,000, and GPT-2's shape with a +1e4 bias,
    against the fp32 reference on the same (rounded) inputs."""
    torch.set_float32_matmul_precision("high")
    try:
        for d_model, d_vocab, softcap, shift in ((256, 256000, 30.0, 0.0), (768, 50257, None, 1e4)):
            h_sae, h_orig, W_U, b_U = make_inputs(512, d_model, d_vocab, dtype, device="cuda", noise=0.1)
            W_U = W_U * 4  # logits up to about +-40: the cap bites
            b_U = (b_U.float() + shift).to(dtype)
            kl = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, reduction="none", softcap=softcap)
            (grad,) = torch.autograd.grad(kl.sum(), h_sae)
            ref_h = h_sae.detach().float().requires_grad_()
            ref = ops.fused_linear_kl(ref_h, h_orig.float(), W_U.float(), b_U.float(), reduction="none",
                                      softcap=softcap, backend="torch")
            (ref_grad,) = torch.autograd.grad(ref.sum(), ref_h)
            rtol = 2e-3 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(kl, ref, atol=1e-4, rtol=rtol)
            scale = ref_grad.abs().max()
            torch.testing.assert_close(grad.float() / scale, ref_grad / scale, atol=rtol, rtol=0)
    finally:
        torch.set_float32_matmul_precision("highest")
