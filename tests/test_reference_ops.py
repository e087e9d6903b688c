"""The PyTorch reference ops (the spec) against autograd of the naive dense forms."""

import pytest
import torch
import torch.nn.functional as F

import fastsae.ops.checks as checks
from fastsae import ops

torch_backend = {"backend": "torch"}


def naive_topk(x, W, b, k):
    values, indices = (x @ W + b).topk(k, dim=-1)
    return values.relu(), indices


def naive_sparse_decode(values, indices, W_dec, b_dec):
    dense = torch.zeros(*values.shape[:-1], W_dec.shape[0], dtype=values.dtype)
    return dense.scatter_add(-1, indices, values) @ W_dec + b_dec


def naive_kl(h_sae, h_orig, W_U, b_U=None):
    log_q = F.log_softmax(h_sae @ W_U + (0 if b_U is None else b_U), dim=-1)
    log_p = F.log_softmax(h_orig @ W_U + (0 if b_U is None else b_U), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks so the chunk seams are exercised."""
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 97)


def test_topk_encode_matches_naive(small_chunks):
    x, W, b = torch.randn(2, 7, 13), torch.randn(13, 50), torch.randn(50)
    values, indices = ops.topk_encode(x, W, b, 5, **torch_backend)
    ref_values, ref_indices = naive_topk(x, W, b, 5)
    assert values.shape == indices.shape == (2, 7, 5) and indices.dtype == torch.int64
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)


def test_topk_encode_gradcheck(small_chunks):
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, W, b: ops.topk_encode(x, W, b, 4, **torch_backend)[0], (x, W, b))


def test_topk_encode_grads_equal_naive_autograd():
    x, W, b = (torch.randn(5, 11, requires_grad=True), torch.randn(11, 30, requires_grad=True),
               torch.randn(30, requires_grad=True))
    grad = torch.randn(5, 3)
    got = torch.autograd.grad(ops.topk_encode(x, W, b, 3, **torch_backend)[0], (x, W, b), grad)
    want = torch.autograd.grad(naive_topk(x, W, b, 3)[0], (x, W, b), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_topk_encode_all_negative_gives_zero_values_and_no_grad():
    x = torch.randn(4, 8, requires_grad=True)
    W, b = torch.randn(8, 20), torch.full((20,), -1e3)
    values, _ = ops.topk_encode(x, W, b, 3, **torch_backend)
    assert torch.all(values == 0)
    values.sum().backward()
    assert torch.all(x.grad == 0)


def test_sparse_decode_matches_naive_and_gradcheck(small_chunks):
    values = torch.rand(3, 4, 6, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 25, (3, 4, 6))
    indices[0, 0] = 7  # the same latent six times in one token: contributions add up
    W = torch.randn(25, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    out = ops.sparse_decode(values, indices, W, b, **torch_backend)
    torch.testing.assert_close(out, naive_sparse_decode(values, indices, W, b))
    torch.autograd.gradcheck(lambda v, W, b: ops.sparse_decode(v, indices, W, b, **torch_backend), (values, W, b))


def test_relu_encode_and_dense_decode_gradcheck():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    acts = ops.relu_encode(x, W, b, **torch_backend)
    torch.testing.assert_close(acts, torch.relu(x @ W + b))
    torch.autograd.gradcheck(lambda x, W, b: ops.relu_encode(x, W, b, **torch_backend), (x, W, b))
    W_dec = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, W, b: ops.dense_decode(a, W, b, **torch_backend), (acts.detach(), W_dec, b_dec))


def test_fused_linear_kl_matches_kl_div_and_gradcheck(small_chunks):
    h_sae = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    h_orig = torch.randn(3, 5, 8, dtype=torch.float64)
    W_U, b_U = torch.randn(8, 31, dtype=torch.float64), torch.randn(31, dtype=torch.float64)
    loss = ops.fused_linear_kl(h_sae, h_orig, W_U, b_U, **torch_backend)
    want = naive_kl(h_sae.reshape(-1, 8), h_orig.reshape(-1, 8), W_U, b_U)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, h_sae)[0], torch.autograd.grad(want, h_sae)[0])
    for reduction in ("mean", "sum", "none"):
        torch.autograd.gradcheck(
            lambda h: ops.fused_linear_kl(h, h_orig, W_U, b_U, reduction=reduction, **torch_backend), (h_sae,))


def test_fused_linear_kl_zero_when_equal():
    h = torch.randn(4, 16, requires_grad=True)
    loss = ops.fused_linear_kl(h, h.detach().clone(), torch.randn(16, 40), **torch_backend)
    assert loss.item() == 0.0
    assert torch.all(torch.autograd.grad(loss, h)[0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ops_run_in_every_dtype(dtype):
    x, W, b = torch.randn(6, 16, dtype=dtype), torch.randn(16, 40, dtype=dtype), torch.randn(40, dtype=dtype)
    values, indices = ops.topk_encode(x, W, b, 4, **torch_backend)
    assert values.dtype == dtype
    ref_values, ref_indices = naive_topk(x.float(), W.float(), b.float(), 4)
    torch.testing.assert_close(values.float(), ref_values, atol=0.2, rtol=0.05)
    out = ops.sparse_decode(values, indices, torch.randn(40, 16, dtype=dtype), torch.zeros(16, dtype=dtype),
                            **torch_backend)
    assert out.dtype == dtype and out.shape == (6, 16)
    kl = ops.fused_linear_kl(x, x.flip(0), torch.randn(16, 33, dtype=dtype), **torch_backend)
    assert kl.dtype == torch.float32 and torch.isfinite(kl) and kl.item() > 0


def test_fused_linear_kl_stats():
    h_orig = torch.randn(2, 6, 8)
    h_sae = h_orig + 0.1 * torch.randn(2, 6, 8)
    W_U = torch.randn(8, 20)
    labels = torch.randint(0, 20, (2, 6))
    labels[:, -1] = -100
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    loss, stats = ops.fused_linear_kl(h_sae, h_orig, W_U, mask=mask, labels=labels, return_stats=True,
                                      **torch_backend)
    keep = mask & (labels != -100)
    ce = lambda h: F.cross_entropy((h @ W_U)[keep], labels[keep])  # noqa: E731
    torch.testing.assert_close(stats.ce_orig, ce(h_orig))
    torch.testing.assert_close(stats.ce_sae, ce(h_sae))
    agree = ((h_orig @ W_U).argmax(-1) == (h_sae @ W_U).argmax(-1))[mask].float().mean()
    torch.testing.assert_close(stats.top1_agreement, agree)
    assert stats.n_tokens.item() == mask.sum().item()
    torch.testing.assert_close(loss, naive_kl(h_sae[mask], h_orig[mask], W_U))


def test_op_argument_errors():
    x, W, b = torch.randn(4, 8), torch.randn(8, 10), torch.randn(10)
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_encode(x, W, b, 11)
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_encode(x, W, b, 0)
    with pytest.raises(ValueError, match="last dimension d_in=8"):
        ops.topk_encode(torch.randn(4, 9), W, b, 2)
    with pytest.raises(ValueError, match="b_enc must have shape"):
        ops.relu_encode(x, W, torch.randn(11))
    with pytest.raises(TypeError, match="W_enc has dtype"):
        ops.topk_encode(x, W.double(), b, 2)
    with pytest.raises(ValueError, match="indices must lie in"):
        ops.sparse_decode(torch.rand(4, 2), torch.tensor([[0, 10]] * 4), torch.randn(10, 8), torch.zeros(8))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.fused_linear_kl(x, x, torch.randn(8, 5), reduction="avg")
    with pytest.raises(TypeError, match="mask must be a bool"):
        ops.fused_linear_kl(x, x, torch.randn(8, 5), mask=torch.ones(4))
    with pytest.raises(ValueError, match="h_orig must have shape"):
        ops.fused_linear_kl(x, x[:2], torch.randn(8, 5))
