"""relu_autoencode (kernels/relu_autoencoder.py and its reference in fastsae/ops/relu_autoencoder.py)
against the naive dense form in float64 and against the path it replaces (relu_encode +
dense_decode + the Lp norm of the dense code).

Both backends run every case: "torch" (the chunked reference, the CPU path) and "triton" (the
kernels, under Triton's interpreter on CPU: small shapes, fp32 and fp16). A transcoder's decoder
writes another width than the encoder reads (d_out != d_in): the d_out parameters, wider and
narrower.
"""

import pytest
import torch
from conftest import HAS_TRITON, KERNEL_DEVICE
from helpers_dispatch import AllocationRecorder
from helpers_encoders import TOL

import fastsae.ops.checks as checks
import fastsae.ops.relu_autoencoder as reference_module
from fastsae import ops

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))]
BANDWIDTH = 0.05


# ------------------------------------------------------------------------------------------ the spec


def _rect(pre, theta):
    u = (pre - theta) / BANDWIDTH
    return ((u > -0.5) & (u < 0.5)).to(pre)


class _JumpReLU(torch.autograd.Function):
    """SAELens's JumpReLU: x * (x > threshold); d/dx = (x > threshold); d/dtheta = -(theta/eps) rect."""

    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return (pre > theta) * grad, (-(theta / BANDWIDTH) * _rect(pre, theta) * grad).sum(0)


class _Step(torch.autograd.Function):
    """SAELens's Step (the L0 count): d/dx = 0; d/dtheta = -(1/eps) rect."""

    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return (pre > theta).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return None, (-(1.0 / BANDWIDTH) * _rect(pre, theta) * grad).sum(0)


def naive(x, W_enc, b_enc, W_dec, b_dec, theta, p):
    """The dense form: every [N, n] tensor built, autograd for the gradients."""
    pre = x @ W_enc + b_enc
    code = torch.relu(pre) if theta is None else _JumpReLU.apply(pre, theta)
    nonzero = code != 0
    lp_sum = torch.where(nonzero, torch.where(nonzero, code, 1).abs() ** p, 0).sum(-1)  # d|c|^p = 0 at c = 0
    l0 = (code > 0).sum(-1).to(pre) if theta is None else _Step.apply(pre, theta).sum(-1)
    return code @ W_dec + b_dec, lp_sum, l0, (code > 0).sum(0, dtype=torch.int32)


def make_inputs(n_tokens, d, n, dtype=torch.float32, *, jump=False, bias_shift=-0.3, seed=0, d_out=None):
    """x [N, d], W_enc (latent-major, as E2ESAE stores it), b_enc, W_dec [n, d_out], b_dec [d_out],
    threshold (or None); d_out: a transcoder's decoder width (d by default).

    x, W_enc, b_enc and the threshold are dyadic (x in quarters, W_enc in 64ths, b_enc = m/64 +
    1/512, threshold = k/64 + 1/1024), so every pre-activation is exact in fp32 (fp16 inputs too)
    and an odd multiple of 1/512: never 0, never equal to a threshold, never on the edge of its
    band (+-BANDWIDTH/2 = +-25.6/1024). The masks are then the fp64 ones, and p < 1, whose
    gradient p c^(p-1) magnifies the error of a tiny code value c, is tested on exact codes.
    """
    g = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(n_tokens, d, generator=g)).round() / 4
    W_enc = ((64 / d**0.5) * torch.randn(n, d, generator=g)).round().t() / 64
    b_enc = (64 * (0.1 * torch.randn(n, generator=g) + bias_shift)).round() / 64 + 1 / 512
    W_dec = torch.randn(n, d, generator=g) / d**0.5
    b_dec = 0.1 * torch.randn(d, generator=g)
    if d_out is not None and d_out != d:
        # A transcoder's decoder from its own generator: g's draws (the threshold's next) stay
        # those of d_out = d, so every decoder width sees the same code.
        g_dec = torch.Generator().manual_seed(seed + 1)
        W_dec = torch.randn(n, d_out, generator=g_dec) / d_out**0.5
        b_dec = 0.1 * torch.randn(d_out, generator=g_dec)
    theta = (64 * (torch.rand(n, generator=g) * 0.3 + 0.05)).round() / 64 + 1 / 1024 if jump else None
    return [None if t is None else t.to(KERNEL_DEVICE, dtype) for t in (x, W_enc, b_enc, W_dec, b_dec, theta)]


def spread_rows(x, top):
    """x with its rows scaled from about 0 to ``top`` (in 8ths, so x stays dyadic): rows of every
    density, from a few active latents to most of them."""
    steps = torch.arange(x.shape[0], device=x.device, dtype=torch.float32)
    return x * ((steps / max(1, x.shape[0] - 1) * top * 8).round() / 8).to(x.dtype)[:, None]


def loss_of(out, weights, jump):
    """A scalar that reaches every output: sum(w_r * recon) + sum(w_lp * lp_sum) (+ sum(w_l0 * l0))."""
    w_recon, w_lp, w_l0 = weights
    loss = (out[0].double() * w_recon).sum() + (out[1].double() * w_lp).sum()
    return loss + (out[2].double() * w_l0).sum() if jump else loss


def run(inputs, backend, p=1.0, weights=None):
    """(outputs, gradients w.r.t. x, W_enc, b_enc, W_dec, b_dec[, threshold], the loss weights)."""
    jump = inputs[5] is not None
    leaves = [t.detach().requires_grad_() for t in inputs if t is not None]
    out = ops.relu_autoencode(*leaves[:5], threshold=leaves[5] if jump else None,
                              bandwidth=BANDWIDTH if jump else None, p=p, backend=backend)
    if weights is None:
        g = torch.Generator().manual_seed(1)
        n_tokens, d_out = inputs[0].shape[0], inputs[3].shape[1]
        weights = [torch.randn(*shape, generator=g, dtype=torch.float64).to(KERNEL_DEVICE)
                   for shape in ((n_tokens, d_out), (n_tokens,), (n_tokens,))]
    grads = torch.autograd.grad(loss_of(out, weights, jump), leaves)
    return out, grads, weights


def check_against_naive(inputs, backend, p=1.0, tol=None):
    dtype = inputs[0].dtype
    jump = inputs[5] is not None
    out, grads, weights = run(inputs, backend, p)
    leaves = [t.detach().double().requires_grad_() for t in inputs if t is not None]
    expected = naive(*leaves[:5], leaves[5] if jump else None, p)
    expected_grads = torch.autograd.grad(loss_of(expected, weights, jump), leaves)
    # p < 1: the code's gradient p c^(p-1) is up to 11x its p = 1 value at the smallest code
    # (1/512), and the fp32 sums of those terms cancel: 3x the tolerance.
    tol = tol or TOL[dtype] * (3 if p < 1 else 1)
    assert out.reconstruction.dtype == dtype and out.reconstruction.shape == (inputs[0].shape[0], inputs[3].shape[1])
    assert out.lp_sum.dtype == out.l0.dtype == torch.float32 and out.fire_counts.dtype == torch.int32
    for name, got, want in zip(("reconstruction", "lp_sum"), out[:2], expected[:2]):
        torch.testing.assert_close(got.double(), want, atol=tol * (want.abs().max().item() + 1), rtol=0, msg=name)
    assert torch.equal(out.l0.double(), expected[2].detach()) and torch.equal(out.fire_counts, expected[3])
    names = ("x", "W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    for name, leaf, got, want in zip(names, inputs, grads, expected_grads):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        torch.testing.assert_close(got.double(), want, atol=4 * tol * (want.abs().max().item() + 1), rtol=0,
                                   msg=lambda m: f"grad {name}: {m}")
    return out


# ------------------------------------------------------------------------------------------ values and gradients


# d_out beside d_in = 24 (and 33, 20, 40 in the tests below): the SAE's own, a transcoder's wider
# and narrower ones (odd sizes: no tile divides them).
D_OUT = pytest.mark.parametrize("d_out", [None, 40, 13], ids=["d_out=d_in", "d_out>d_in", "d_out<d_in"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("jump", [False, True], ids=["relu", "jumprelu"])
@D_OUT
def test_matches_naive_form(backend, jump, p, d_out):
    """A mixed code (rows from a few latents to about half of them), fp32: forward and every gradient."""
    inputs = make_inputs(37, 24, 300, jump=jump, d_out=d_out)
    inputs[0] = spread_rows(inputs[0], 2.5)
    check_against_naive(inputs, backend, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("jump", [False, True], ids=["relu", "jumprelu"])
@pytest.mark.parametrize("code", ["sparse", "dense"])
@D_OUT
def test_sparse_and_dense_codes(backend, jump, code, d_out):
    """A trained SAE's code (a few latents per token: every row on the compact path) and an
    initial one (about half active: every row dense), odd shapes."""
    shift = -2.0 if code == "sparse" else 0.0
    out = check_against_naive(make_inputs(21, 33, 257, jump=jump, bias_shift=shift, d_out=d_out), backend)
    if code == "sparse":
        assert 0 < out.l0.mean() < 10
    else:
        assert out.l0.mean() > 100


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("jump", [False, True], ids=["relu", "jumprelu"])
@D_OUT
def test_rows_past_the_capacity_mixed_with_compact_rows(monkeypatch, backend, jump, d_out):
    """A small capacity: about half the rows overflow it (dense path), the rest stay compact."""
    from fastsae.kernels import _sparse_code  # sparse_capacity reads these

    for module, prefix in ((_sparse_code, "SPARSE"), (reference_module, "REFERENCE")):
        monkeypatch.setattr(module, f"{prefix}_MIN_CAPACITY", 12)
        monkeypatch.setattr(module, f"{prefix}_CAPACITY_FRACTION", 0.0)
    inputs = make_inputs(30, 20, 150, jump=jump, bias_shift=-1.0, d_out=d_out)
    inputs[0] = spread_rows(inputs[0], 3.0)
    out = check_against_naive(inputs, backend)
    held = out.l0  # the band adds a few more for JumpReLU
    assert int((held > 12).sum()) >= 8 and int(((held <= 10) & (held > 0)).sum()) >= 5


@pytest.mark.parametrize("backend", BACKENDS)
@D_OUT
def test_dense_rows_over_several_latent_chunks(monkeypatch, backend, d_out):
    """The dense rows' workspace holds fewer latents than the dictionary: chunks of 128 latents
    (first, middle, last), the reconstruction ([N, d_out]) and grad_x ([N, d_in]) summed across
    them in fp32."""
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 400)  # the reference: one token per chunk
    assert reference_module.workspace_elements() // 9 // 128 == 1  # the kernels: 128 latents per chunk
    for jump in (False, True):
        check_against_naive(make_inputs(9, 20, 300, jump=jump, bias_shift=0.2, d_out=d_out), backend, p=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("jump", [False, True], ids=["relu", "jumprelu"])
@pytest.mark.parametrize("d_out", [None, 56], ids=["sae", "transcoder"])
def test_matches_the_path_it_replaces(backend, jump, d_out):
    """relu_encode + dense_decode + ||code||_p (the trainer's path today), for ReLU; for JumpReLU the
    same with the code masked by pre > threshold: equal losses and gradients. A transcoder's
    target is another activation of width d_out (here a fixed one)."""
    inputs = make_inputs(26, 40, 200, jump=jump, bias_shift=-0.5, d_out=d_out)
    inputs[0] = spread_rows(inputs[0], 2.5)
    target = None if d_out is None else torch.randn(26, d_out, generator=torch.Generator().manual_seed(2)).to(
        KERNEL_DEVICE)
    for p in (1.0, 0.5):
        leaves = [t.detach().requires_grad_() for t in inputs if t is not None]
        x, W_enc, b_enc, W_dec, b_dec = leaves[:5]
        d_in = x.shape[1]
        out = ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=leaves[5] if jump else None,
                                  bandwidth=BANDWIDTH if jump else None, p=p, backend=backend)
        loss = (torch.nn.functional.mse_loss(out.reconstruction, x if target is None else target)
                + 0.7 * out.lp_sum.pow(1 / p).mean() / d_in)
        grads = torch.autograd.grad(loss, leaves)

        old = [t.detach().requires_grad_() for t in leaves]
        code = ops.relu_encode(old[0], old[1], old[2], backend=backend)
        if jump:
            pre = old[0] @ old[1] + old[2]
            code = _JumpReLU.apply(pre, old[5])  # SAELens's form, on the same pre-activations
        recon = ops.dense_decode(code, old[3], old[4], backend=backend)
        old_loss = (torch.nn.functional.mse_loss(recon, old[0] if target is None else target)
                    + 0.7 * torch.linalg.vector_norm(code.float(), ord=p, dim=-1).mean() / d_in)
        old_grads = torch.autograd.grad(old_loss, old)
        torch.testing.assert_close(loss, old_loss, atol=1e-6, rtol=1e-5)
        for name, got, want in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec", "threshold"), grads, old_grads):
            torch.testing.assert_close(got, want, atol=2e-5 * (want.abs().max().item() + 1e-3), rtol=0,
                                       msg=lambda m: f"p={p} grad {name}: {m}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("jump", [False, True], ids=["relu", "jumprelu"])
@pytest.mark.parametrize("d_out", [None, 72, 24], ids=["d_out=d_in", "d_out>d_in", "d_out<d_in"])
def test_fp16_under_the_interpreter(jump, d_out):
    check_against_naive(make_inputs(19, 40, 130, torch.float16, jump=jump, bias_shift=-0.6, d_out=d_out), "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 16, 100), (7, 17, 65), (40, 8, 30)], ids=lambda s: "N{}-d{}-n{}".format(*s))
def test_odd_shapes(backend, shape):
    """N = 1, d not a power of two, n not a multiple of any tile, n below the capacity's floor."""
    for jump in (False, True):
        check_against_naive(make_inputs(*shape, jump=jump, bias_shift=-0.8), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_code(backend):
    """No latent active anywhere: the reconstruction is b_dec, lp_sum and l0 are 0, nothing fired,
    and only b_dec gets a gradient."""
    for jump in (False, True):
        inputs = make_inputs(11, 16, 90, jump=jump, bias_shift=-100.0)
        out, grads, weights = run(inputs, backend)
        torch.testing.assert_close(out.reconstruction, inputs[4].expand(11, 16), atol=0, rtol=0)
        assert not bool(out.lp_sum.any() or out.l0.any() or out.fire_counts.any())
        assert all(not bool(g.any()) for i, g in enumerate(grads) if i != 4)
        torch.testing.assert_close(grads[4].double(), weights[0].sum(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pre_activations_tied_with_the_threshold(backend):
    """Latents whose pre-activation equals the threshold exactly (W_enc column 0, b_enc = theta):
    inactive (pre > theta is strict) but in the band (rect(0) = 1), so the threshold gets
    -(theta / eps) * dL/dcode - (1 / eps) * dL/dl0 from every token, as SAELens's estimator."""
    inputs = make_inputs(13, 16, 80, jump=True, bias_shift=-0.5)
    tied = torch.arange(0, 80, 7, device=KERNEL_DEVICE)
    inputs[1][:, tied] = 0
    inputs[2][tied] = inputs[5][tied]
    out = check_against_naive(inputs, backend)
    assert not bool(out.fire_counts[tied].any())
    _, grads, (w_recon, _, w_l0) = run(inputs, backend)
    dcode = (w_recon @ inputs[3][tied].double().t())  # [N, tied]: dL/dcode
    want = (-(inputs[5][tied].double() / BANDWIDTH) * dcode - w_l0[:, None] / BANDWIDTH).sum(0)
    torch.testing.assert_close(grads[5][tied].double(), want, atol=1e-4 * (want.abs().max().item() + 1), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["latent_major", "contiguous", "strided_slice"])
def test_w_enc_layouts(backend, layout):
    """E2ESAE's latent-major W_enc, a contiguous [d, n] one and a non-dense slice: the same numbers."""
    inputs = make_inputs(17, 24, 120, jump=True, bias_shift=-0.4)
    W = inputs[1]
    if layout == "contiguous":
        inputs[1] = W.contiguous()
    elif layout == "strided_slice":
        inputs[1] = torch.cat([W, torch.randn_like(W)], dim=1)[:, ::2]
    assert inputs[1].stride() != (1, 24) or layout == "latent_major"
    check_against_naive(inputs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_token_stays_in_that_token(backend):
    """A NaN in one token's x: that token's reconstruction and lp_sum are NaN and its l0 is 0 (NaN is
    not > 0), every other token's outputs are the finite-input values, and the NaN reaches the
    gradients where the reference's dense products send it (grad_x: that token's row only)."""
    for jump in (False, True):
        inputs = make_inputs(12, 16, 100, jump=jump, bias_shift=-1.0)
        clean, clean_grads, weights = run(inputs, backend)
        inputs[0] = inputs[0].clone()
        inputs[0][5, 3] = float("nan")
        out, grads, _ = run(inputs, backend, weights=weights)
        others = [t for t in range(12) if t != 5]
        assert bool(out.reconstruction[5].isnan().all()) and bool(out.lp_sum[5].isnan()) and out.l0[5] == 0
        torch.testing.assert_close(out.reconstruction[others], clean.reconstruction[others], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.lp_sum[others], clean.lp_sum[others], atol=1e-6, rtol=0)
        assert torch.equal(out.l0[others], clean.l0[others])
        assert bool(grads[0][5].isnan().all()) and not bool(grads[0][others].isnan().any())
        torch.testing.assert_close(grads[0][others], clean_grads[0][others], atol=1e-5, rtol=0)
        if backend == "triton":  # the same NaN pattern as the reference in every gradient
            _, ref_grads, _ = run(inputs, "torch", weights=weights)
            for got, want in zip(grads, ref_grads):
                assert torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_out", [16, 24], ids=["sae", "transcoder"])
def test_leading_dimensions_and_frozen_inputs(backend, d_out):
    """x [2, 5, d_in] gives [2, 5, d_out], [2, 5], [2, 5]; inputs that need no gradient get none."""
    x, W_enc, b_enc, W_dec, b_dec, _ = make_inputs(10, 16, 70, d_out=d_out)
    W_dec.requires_grad_()
    out = ops.relu_autoencode(x.view(2, 5, 16), W_enc, b_enc, W_dec, b_dec, backend=backend)
    assert out.reconstruction.shape == (2, 5, d_out) and out.lp_sum.shape == out.l0.shape == (2, 5)
    assert out.fire_counts.shape == (70,) and not out.l0.requires_grad
    (grad_w_dec,) = torch.autograd.grad(out.reconstruction.sum() + out.lp_sum.sum(), (W_dec,))
    _, grads, _ = run([x, W_enc, b_enc, W_dec, b_dec, None], backend, weights=[
        torch.ones(10, d_out, dtype=torch.float64, device=KERNEL_DEVICE),
        torch.ones(10, dtype=torch.float64, device=KERNEL_DEVICE), None])
    torch.testing.assert_close(grad_w_dec, grads[3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_out", [16, 24], ids=["sae", "transcoder"])
def test_empty_batch(backend, d_out):
    x, W_enc, b_enc, W_dec, b_dec, theta = make_inputs(1, 16, 70, jump=True, d_out=d_out)
    leaves = [t.detach().requires_grad_() for t in (x[:0], W_enc, b_enc, W_dec, b_dec, theta)]
    out = ops.relu_autoencode(*leaves[:5], threshold=leaves[5], bandwidth=BANDWIDTH, backend=backend)
    assert out.reconstruction.shape == (0, d_out) and out.lp_sum.shape == (0,) and not bool(out.fire_counts.any())
    grads = torch.autograd.grad(out.reconstruction.sum() + out.lp_sum.sum() + out.l0.sum(), leaves)
    assert grads[0].shape == (0, 16) and all(not bool(g.any()) for g in grads)


def test_errors():
    x, W_enc, b_enc, W_dec, b_dec, theta = make_inputs(4, 16, 30, jump=True)
    with pytest.raises(ValueError, match="bandwidth is required"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=theta.clone().requires_grad_())
    with pytest.raises(ValueError, match="bandwidth must be a positive"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=theta, bandwidth=0.0)
    with pytest.raises(ValueError, match="p must be a positive"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, p=-1)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=theta - 1, bandwidth=0.1)
    with pytest.raises(ValueError, match=r"W_dec must have shape \(30, any\) \(\[n_latents, d_out\]"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec.t(), b_dec)
    with pytest.raises(ValueError, match=r"W_dec must have shape \(30, any\).*got \(29, 16\)"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec[:-1], b_dec)
    with pytest.raises(ValueError, match=r"W_dec must have 2 dimensions"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec[0], b_dec)
    # A transcoder's decoder may be of another width than x, but b_dec must match W_dec's
    with pytest.raises(ValueError, match=r"b_dec must have shape \(24,\) \(d_out, W_dec's columns\), got \(16,\)"):
        ops.relu_autoencode(x, W_enc, b_enc, torch.cat([W_dec, W_dec[:, :8]], dim=1), b_dec)
    with pytest.raises(ValueError, match="threshold must have shape"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=theta[:-1], bandwidth=0.1)
    with pytest.raises(ValueError, match="last dimension"):
        ops.relu_autoencode(x[:, :15], W_enc, b_enc, W_dec, b_dec)
    with pytest.raises(TypeError, match="dtype"):
        ops.relu_autoencode(x, W_enc, b_enc, W_dec.double(), b_dec)


@pytest.mark.parametrize("d_out", [None, 7], ids=["sae", "transcoder"])
def test_float64_takes_the_reference_and_passes_gradcheck(d_out):
    """The reference in float64 is exactly differentiable where the masks are stable (make_inputs
    keeps every pre-activation 1/1024 or more from 0, the threshold and its band's edges, more than
    gradcheck's steps move it): torch.autograd.gradcheck."""
    inputs = [t.double() for t in make_inputs(6, 5, 40, jump=True, bias_shift=-0.2, seed=3, d_out=d_out)]

    def fn(*leaves):
        out = ops.relu_autoencode(*leaves[:5], threshold=leaves[5], bandwidth=BANDWIDTH, p=0.7, backend="torch")
        return out.reconstruction, out.lp_sum

    leaves = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, leaves[:5] + [leaves[5].detach()], eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------------------------------ memory


def largest_code_sized(fn, n_tokens, n_latents, weight_shapes):
    """The largest tensor allocated by fn, leaving out the weights' shapes."""
    recorder = AllocationRecorder()
    with recorder:
        fn()
    sizes = [torch.Size(s).numel() for s in recorder.shapes if tuple(s) not in weight_shapes]
    return max(sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", ["sparse", "dense"])
def test_no_n_by_n_latents_tensor_in_forward_and_backward(monkeypatch, backend, density):
    """Forward + backward with MSE + Lp allocate nothing near [N, n_latents]: the reference at 96
    tokens x 1,024 latents (its chunks are [1, n]), the kernels under the interpreter at 48 x 512
    (their dense-row workspaces [N, n / 4], 4 x CHUNK_ELEMENTS); the weights and their gradients
    are left out."""
    n_tokens, d, n_latents = (96, 16, 1024) if backend == "torch" else (48, 16, 512)
    # reference: [1, n] chunks; kernels: [N, n / 4] workspaces
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 6 * n_latents if backend == "torch" else 3 * n_latents)
    for jump in (False, True):
        inputs = make_inputs(n_tokens, d, n_latents, jump=jump, bias_shift=-1.5 if density == "sparse" else 0.0)
        leaves = [t.detach().requires_grad_() for t in inputs if t is not None]

        def step():
            out = ops.relu_autoencode(*leaves[:5], threshold=leaves[5] if jump else None,
                                      bandwidth=BANDWIDTH if jump else None, backend=backend)
            loss = torch.nn.functional.mse_loss(out.reconstruction, leaves[0]) + out.lp_sum.mean() / d
            loss.backward()

        weights = {(d, n_latents), (n_latents, d), (n_latents,), (d,)}
        largest = largest_code_sized(step, n_tokens, n_latents, weights)
        assert largest <= n_tokens * n_latents // 4, f"a temporary of {largest} elements ({density}, jump={jump})"


def test_memory_estimate_counts_the_decoders_width():
    """fastsae plan's model: d_out defaults to d_in (an SAE); a transcoder's wider decoder adds the
    forward's fp32 [N, d_out] sum across the dense rows' chunks once it outgrows backward's
    workspaces, and never changes the code's bytes."""
    args = (16384, 46080, 768, 2)
    sae = reference_module.memory_estimate(*args)
    assert reference_module.memory_estimate(*args, d_out=768) == sae
    narrow = reference_module.memory_estimate(*args, d_out=256)
    assert narrow == sae  # backward's [N, d_in] sum and workspaces are the larger
    wide = reference_module.memory_estimate(*args, d_out=768 * 16)
    assert wide.code == sae.code and wide.workspaces > sae.workspaces
    bigger = reference_module.memory_estimate(*args, d_out=768 * 17)
    assert bigger.workspaces - wide.workspaces == 4 * 16384 * 768  # fp32, one row per token


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["dense_code", "sparse_code"])
@pytest.mark.parametrize("jump", [False, True], ids=["relu", "jumprelu"])
@pytest.mark.parametrize("d_out", [None, 3072], ids=["sae", "transcoder"])
def test_gpu_matches_naive_form(dtype, bias_shift, jump, d_out):
    inputs = make_inputs(512, 768, 24576, dtype, jump=jump, bias_shift=bias_shift, d_out=d_out)
    check_against_naive(inputs, "triton", tol=TOL[dtype] * 4)


@pytest.mark.gpu
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["dense_code", "sparse_code"])
def test_gpu_has_no_host_sync(bias_shift):
    """Forward and backward, dense or sparse code: nothing waits on the GPU."""
    inputs = make_inputs(512, 768, 24576, torch.bfloat16, jump=True, bias_shift=bias_shift)
    run(inputs, "triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(inputs, "triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_threshold_needs_no_bandwidth(backend):
    """A threshold that is not trained (BatchTopK's inference threshold, a buffer) may come without
    a bandwidth: the same code as with one, and a threshold of 0 is the plain ReLU."""
    x, W_enc, b_enc, W_dec, b_dec, theta = make_inputs(9, 16, 60, jump=True)
    fixed = ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=theta, backend=backend)
    trained = ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=theta, bandwidth=BANDWIDTH, backend=backend)
    for got, want in zip(fixed, trained):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    zero = ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, threshold=torch.zeros_like(theta), backend=backend)
    relu = ops.relu_autoencode(x, W_enc, b_enc, W_dec, b_dec, backend=backend)
    for got, want in zip(zero, relu):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
