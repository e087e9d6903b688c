"""Fused ReLU encoder (kernels/relu_encoder.py) against relu_encode_reference and its autograd.

Both backward paths (dense GEMMs; capacity-bounded compaction + the TopK encoder's sparse kernels
with their per-row dense fallback) run in turn, on dense, sparse and mixed codes.
"""

import pytest
import torch
from conftest import needs_triton
from helpers_encoders import DTYPES, TOL, make_inputs

from fastsae import ops
from fastsae.ops.relu_encoder import relu_encode_reference

pytestmark = needs_triton

rk = pytest.importorskip("fastsae.kernels.relu_encoder")
sc = pytest.importorskip("fastsae.kernels._sparse_code")  # the compaction and the capacity


def reference_grads(x, W, b, grad_acts):
    """fp64 autograd of the reference (the spec), on the same inputs."""
    x64, W64, b64 = (t.detach().double().requires_grad_() for t in (x, W, b))
    acts = relu_encode_reference(x64, W64, b64)
    return acts, torch.autograd.grad((acts * grad_acts.double()).sum(), (x64, W64, b64))


def check(x, W, b, dtype, sparse_backward):
    for t in (x, W, b):
        t.requires_grad_()
    acts = rk.relu_encode_triton(x, W, b, sparse_backward=sparse_backward)
    assert acts.dtype == dtype and acts.shape == (x.shape[0], W.shape[1])
    grad_acts = torch.randn_like(acts)
    ref_acts, ref_grads = reference_grads(x, W, b, grad_acts)
    scale = ref_acts.abs().max().item() + 1
    torch.testing.assert_close(acts.double(), ref_acts, atol=TOL[dtype] * scale, rtol=0)
    # The ReLU mask must be the reference's except where rounding puts a score at 0.
    pre = x.double() @ W.double() + b.double()
    mask_differs = (acts > 0) != (ref_acts > 0)
    assert bool((pre[mask_differs].abs() <= TOL[dtype] * scale).all())
    got = torch.autograd.grad((acts * grad_acts).sum(), (x, W, b))
    if bool(mask_differs.any()):  # compare against autograd of our own mask
        grad_pre = torch.where(acts > 0, grad_acts, 0).double()
        ref_grads = (grad_pre @ W.double().t(), x.double().t() @ grad_pre, grad_pre.sum(0))
    for name, g, e in zip(("x", "W_enc", "b_enc"), got, ref_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), e, atol=4 * TOL[dtype] * (e.abs().max().item() + 1),
                                   rtol=0, msg=name)


SHAPES = [(1, 16, 100), (7, 40, 300), (33, 96, 257), (20, 33, 65)]


@pytest.mark.parametrize("sparse_backward", [False, True], ids=["dense_bwd", "sparse_bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-d{}-n{}".format(*s))
def test_matches_reference_dense_code(shape, dtype, sparse_backward):
    """About half the code is active: both backward paths must still be exact."""
    check(*make_inputs(*shape, dtype), dtype, sparse_backward)


@pytest.mark.parametrize("sparse_backward", [False, True, None], ids=["dense_bwd", "sparse_bwd", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_sparse_code(dtype, sparse_backward):
    """A trained-SAE-like code: a few active latents per token (and some tokens with none)."""
    x, W, b = make_inputs(24, 48, 600, dtype, bias_shift=-2.3)  # ~1 % active
    check(x, W, b, dtype, sparse_backward)


def test_all_inactive_code_gives_zero_grads():
    x, W, b = make_inputs(5, 16, 70, torch.float32, bias_shift=-100.0)
    for sparse in (False, True):
        xs, Ws, bs = (t.clone().requires_grad_() for t in (x, W, b))
        acts = rk.relu_encode_triton(xs, Ws, bs, sparse_backward=sparse)
        assert bool((acts == 0).all())
        grads = torch.autograd.grad(acts.sum(), (xs, Ws, bs))
        assert all(bool((g == 0).all()) for g in grads)


def rows_of_mixed_density(n_tokens, d_in, n_latents, dtype):
    """Inputs whose rows range from no active latent to about half of them active."""
    x, W, b = make_inputs(n_tokens, d_in, n_latents, dtype, bias_shift=-1.0)
    scale = torch.linspace(0.0, 3.0, n_tokens, device=x.device)[:, None]
    return (x.float() * scale).to(dtype), W, b


@pytest.mark.parametrize("layout", ["latent_major", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_backward_mixes_compact_and_dense_rows(monkeypatch, dtype, layout):
    """Rows with at most C active latents go through the compact code, wider rows through the
    kernels' dense per-row path, in one backward; both with E2ESAE's latent-major W_enc too."""
    monkeypatch.setattr(sc, "SPARSE_MIN_CAPACITY", 40)
    monkeypatch.setattr(sc, "SPARSE_CAPACITY_FRACTION", 0.0)
    assert sc.sparse_capacity(200) == 40
    x, W, b = rows_of_mixed_density(37, 40, 200, dtype)
    if layout == "latent_major":
        W = W.t().contiguous().t()
    active = (relu_encode_reference(x.float(), W.float(), b.float()) > 0).sum(1)
    assert int((active > 40).sum()) >= 5 and int(((active <= 40) & (active > 0)).sum()) >= 5
    check(x, W, b, dtype, sparse_backward=True)


def test_sparse_capacity():
    assert sc.sparse_capacity(46080) == 192  # GPT-2 small at ratio 60: 3x the paper's L0
    assert sc.sparse_capacity(131072) == 512
    assert sc.sparse_capacity(1000) == 64 and sc.sparse_capacity(30) == 30


def test_compact_active():
    acts = torch.tensor([[0.0, 2.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 1.0, 0.0, 1.0]])
    grad = torch.arange(15.0).reshape(3, 5) + 1
    values, indices, dense = sc.compact_active(grad, acts, 3)
    pad = torch.iinfo(torch.int32).max
    assert dense.count.tolist() == [3, 0, 4] and indices.dtype == torch.int32
    assert values[:2].tolist() == [[2.0, 4.0, 5.0], [0.0, 0.0, 0.0]]
    assert indices[:2].tolist() == [[1, 3, 4], [pad, pad, pad]]
    assert dense.rows[:1].tolist() == [2] and dense.n_rows.tolist() == [1]  # row 2 has 4 > 3 active
    # a stride-0 gradient (acts.sum()) is read as it is
    values, _, _ = sc.compact_active(torch.ones(1, 1).expand(3, 5), acts, 5)
    assert values.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0], [0.0] * 5, [1.0, 1.0, 1.0, 1.0, 0.0]]


def test_sparse_backward_allocates_nothing_code_sized():
    """The sparse backward works from acts and grad_acts as they are: no [N, n] temporary (not
    even a bool mask), only the [N, C] compact code."""
    from torch.profiler import ProfilerActivity, profile

    n_tokens, d_in, n_latents = 64, 8, 1024  # grad_x, grad_W and the [N, 64] code: below N * n bytes
    x, W, b = make_inputs(n_tokens, d_in, n_latents, torch.float32, bias_shift=-0.5)
    leaves = [t.requires_grad_() for t in (x, W, b)]
    acts = rk.relu_encode_triton(*leaves, sparse_backward=True)
    grad_acts = torch.randn_like(acts)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = torch.autograd.grad(acts, leaves, grad_acts)
    code_sized = [(e.name, e.self_cpu_memory_usage) for e in prof.events()
                  if e.self_cpu_memory_usage >= n_tokens * n_latents]
    assert code_sized == []
    grad_pre = torch.where(acts > 0, grad_acts, 0)
    torch.testing.assert_close(got[0], grad_pre @ W.detach().t(), atol=1e-5, rtol=1e-5)


def test_public_op_and_errors():
    x, W, b = make_inputs(12, 16, 90, torch.float32)
    acts = ops.relu_encode(x.view(3, 4, 16), W, b, backend="triton")
    assert acts.shape == (3, 4, 90)
    torch.testing.assert_close(acts.view(12, 90), relu_encode_reference(x, W, b), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="last dimension"):
        ops.relu_encode(x[:, :15], W, b, backend="triton")
    with pytest.raises(ValueError, match="b_enc must have shape"):
        ops.relu_encode(x, W, b[:-1], backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        ops.relu_encode(x.half(), W, b, backend="triton")
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.relu_encode(x, W.numpy(), b, backend="triton")


def test_strided_bias():
    """b_enc a strided view (every other entry of a longer tensor): read at its stride."""
    x, W, _ = make_inputs(12, 16, 90, torch.float32)
    b = torch.randn(180, device=x.device)[::2]
    torch.testing.assert_close(ops.relu_encode(x, W, b, backend="triton"), relu_encode_reference(x, W, b),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------ empty batch, int64 offsets, backward memory

BACKWARDS = [False, True, None]
BACKWARD_IDS = ["dense_bwd", "sparse_bwd", "auto"]


@pytest.mark.parametrize("sparse_backward", BACKWARDS, ids=BACKWARD_IDS)
def test_empty_batch_matches_reference(sparse_backward):
    """N = 0: an empty code, an empty grad_x and zero grad_W_enc / grad_b_enc, like the reference."""
    _, W, b = make_inputs(1, 16, 90, torch.float32)
    x = torch.randn(0, 16, device=W.device)
    leaves = [t.clone().requires_grad_() for t in (x, W, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, W, b)]
    acts = rk.relu_encode_triton(*leaves, sparse_backward=sparse_backward)
    ref = ops.relu_encode(*ref_leaves, backend="torch")
    assert acts.shape == ref.shape == (0, 90) and acts.dtype == ref.dtype
    for g, r in zip(torch.autograd.grad(acts.sum(), leaves), torch.autograd.grad(ref.sum(), ref_leaves)):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, atol=0, rtol=0)
    assert ops.relu_encode(x.view(2, 0, 16), W, b, backend="triton").shape == (2, 0, 90)


FAR = 2**31 - 4096  # see tests/test_topk_encoder.py: row 2 at 2 * FAR wraps to -8192 in int32


@pytest.mark.parametrize("sparse_backward", [False, True], ids=["dense_bwd", "sparse_bwd"])
def test_offsets_beyond_int32(sparse_backward):
    """x rows FAR elements apart (token * stride_xm > 2^31, as N * d is at 524,288 tokens of
    d = 4,096): the forward's GEMM tile and the sparse backward must use int64 offsets. The
    storage is 8 GiB of fp16 that torch.empty only reserves; a few pages get touched."""
    dtype = torch.float16
    _, W, b = make_inputs(1, 16, 40, dtype)
    storage = torch.empty(8192 + 2 * FAR + 16, dtype=dtype, device=W.device)
    storage[:8192 + 16].zero_()
    x = storage.as_strided((3, 16), (FAR, 1), 8192)
    x.copy_(torch.randn(3, 16, device=W.device).to(dtype))
    leaves = [x.requires_grad_(), W.requires_grad_(), b.requires_grad_()]
    acts = rk.relu_encode_triton(*leaves, sparse_backward=sparse_backward)
    ref_leaves = [t.detach().contiguous().requires_grad_() for t in leaves]
    ref = rk.relu_encode_triton(*ref_leaves, sparse_backward=sparse_backward)
    torch.testing.assert_close(acts, ref, atol=0, rtol=0)
    grad_acts = torch.randn_like(acts)
    for g, r in zip(torch.autograd.grad(acts, leaves, grad_acts), torch.autograd.grad(ref, ref_leaves, grad_acts)):
        torch.testing.assert_close(g, r, atol=0, rtol=0)


@pytest.mark.parametrize("sparse_backward", [False, True], ids=["dense_bwd", "sparse_bwd"])
def test_backward_masks_without_writing_grad_acts(sparse_backward):
    """The ReLU mask goes into a fresh tensor: the caller's grad_acts, a stride-0 one
    (acts.sum()) and one autograd shares between two consumers all stay as they were."""
    x, W, b = make_inputs(9, 24, 130, torch.float32)
    leaves = [t.requires_grad_() for t in (x, W, b)]
    acts = rk.relu_encode_triton(*leaves, sparse_backward=sparse_backward)
    masked = torch.where(acts > 0, 1.0, 0.0).detach()
    grad_acts = torch.randn_like(acts)
    kept = grad_acts.clone()
    got = torch.autograd.grad(acts, leaves, grad_acts, retain_graph=True)
    assert torch.equal(grad_acts, kept)
    want = (grad_acts * masked @ W.detach().t(), x.detach().t() @ (grad_acts * masked), (grad_acts * masked).sum(0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # acts.sum(): autograd passes an expanded (stride-0) tensor of ones.
    (grad_b,) = torch.autograd.grad(acts.sum(), (b,), retain_graph=True)
    torch.testing.assert_close(grad_b, masked.sum(0))
    # acts + other: AddBackward hands one gradient tensor to both; other's gradient must be intact.
    other = torch.zeros_like(acts).requires_grad_()
    grad_b, grad_other = torch.autograd.grad(acts + other, (b, other), grad_acts)
    assert torch.equal(grad_other, kept)
    torch.testing.assert_close(grad_b, (kept * masked).sum(0), atol=1e-5, rtol=1e-5)


def test_dense_backward_allocates_one_code_sized_buffer():
    """grad_pre = grad_acts * (acts > 0) costs one [N, n] allocation: no zeros tensor, no bool
    mask beside it (it was a zeros_like, a bool mask and the torch.where output)."""
    from torch.profiler import ProfilerActivity, profile

    n_tokens, d_in, n_latents = 64, 8, 512  # grad_x, grad_W: smaller than N * n bytes
    x, W, b = make_inputs(n_tokens, d_in, n_latents, torch.float32)
    leaves = [t.requires_grad_() for t in (x, W, b)]
    acts = rk.relu_encode_triton(*leaves, sparse_backward=False)
    grad_acts = torch.randn_like(acts)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(acts, leaves, grad_acts)
    code_sized = [(e.name, e.self_cpu_memory_usage) for e in prof.events()
                  if e.self_cpu_memory_usage >= n_tokens * n_latents]  # even a bool [N, n] counts
    assert len(code_sized) == 1, code_sized


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("sparse_backward", [False, True, None], ids=["dense_bwd", "sparse_bwd", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["dense_code", "sparse_code"])
def test_gpu_matches_reference(dtype, sparse_backward, bias_shift):
    x, W, b = make_inputs(512, 768, 24576, dtype, device="cuda", bias_shift=bias_shift)
    check(x, W, b, dtype, sparse_backward)


@pytest.mark.gpu
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["dense_code", "sparse_code"])
def test_gpu_sparse_backward_has_no_host_sync(bias_shift):
    """The sparse backward (compaction, dense-row list, sort, kernels) never waits on the GPU."""
    x, W, b = make_inputs(512, 768, 24576, torch.bfloat16, device="cuda", bias_shift=bias_shift)
    leaves = [t.requires_grad_() for t in (x, W, b)]
    acts = rk.relu_encode_triton(*leaves, sparse_backward=True)
    grad_acts = torch.randn_like(acts)
    torch.autograd.grad(acts, leaves, grad_acts, retain_graph=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(acts, leaves, grad_acts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
