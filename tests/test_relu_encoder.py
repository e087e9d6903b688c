"""Fused ReLU encoder (kernels/relu_encoder.py) against relu_encode_reference and its autograd.

Both backward paths (dense GEMMs, sparse compaction + the TopK encoder's sparse kernels) are
forced in turn, and the density switch is checked on dense and sparse codes.
"""

import pytest
import torch
from compile_check import ARCHS, check_compile_report
from conftest import needs_triton
from helpers_encoders import DTYPES, TOL, make_inputs

from fastsae import ops
from fastsae.ops.relu_encoder import relu_encode_reference

pytestmark = needs_triton

rk = pytest.importorskip("fastsae.kernels.relu_encoder")


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


@pytest.mark.parametrize("sparse_backward", [False, True, None], ids=["dense_bwd", "sparse_bwd", "auto"])
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


def test_density_switch():
    n_latents = 5000
    sparse_code = torch.zeros(8, n_latents)
    sparse_code[:, :3] = 1.0  # 3 / 5000 = 6e-4 of each row
    assert rk.choose_sparse_backward(sparse_code)
    dense_code = torch.zeros(8, n_latents)
    dense_code[0, : int(2 * rk.SPARSE_DENSITY_THRESHOLD * n_latents) + 1] = 1.0  # one wide row
    assert not rk.choose_sparse_backward(dense_code)


def test_auto_backward_takes_the_path_the_density_says(monkeypatch):
    taken = []
    real = rk.sparse_encoder_backward

    def spy(*args):
        taken.append("sparse")
        return real(*args)

    monkeypatch.setattr(rk, "sparse_encoder_backward", spy)
    # The shipped threshold is for tens of thousands of latents; at this test's width, 5 %.
    monkeypatch.setattr(rk, "SPARSE_DENSITY_THRESHOLD", 0.05)
    for bias_shift, expected in ((-2.5, ["sparse"]), (0.0, [])):  # ~0.6 % and ~50 % active
        taken.clear()
        x, W, b = make_inputs(6, 32, 1000, torch.float32, bias_shift=bias_shift)
        W.requires_grad_()
        acts = ops.relu_encode(x, W, b, backend="triton")
        torch.autograd.grad(acts.sum(), (W,))
        assert taken == expected, (bias_shift, taken)


def test_compact_rows():
    dense = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    values, indices = rk.compact_rows(dense)
    assert values.shape == indices.shape == (3, 2)
    assert values.tolist() == [[2.0, -1.0], [0.0, 0.0], [5.0, 0.0]]
    assert indices.tolist() == [[1, 3], [0, 0], [0, 0]]
    rebuilt = torch.zeros_like(dense).scatter_add_(1, indices, values)
    assert torch.equal(rebuilt, dense)


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


# ------------------------------------------------------------------ compile checks (sm_80, sm_90)

# The sparse backward's kernels are those of kernels/topk_encoder.py, compile-checked in
# tests/test_topk_encoder.py.
def compile_cases():
    """The forward kernel and the backward's masking kernel at their shipped configs per dtype
    (tests/compile_check.py)."""
    from fastsae.kernels import relu_encoder as K

    cases = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        block_m, block_n, block_d, warps, stages = K.FWD_CONFIGS[dtype]
        ptr = "*" + name
        signature = dict(x_ptr=ptr, w_ptr=ptr, b_ptr=ptr, out_ptr=ptr, n_tokens="i32", d_in="i32",
                         n_latents="i32", stride_xm="i32", stride_xd="i32", stride_wd="i32",
                         stride_wn="i32", stride_om="i32", stride_on="i32")
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GROUP_M=K.GROUP_M,
                          DOT_PRECISION="ieee" if name == "fp32" else "tf32")
        cases[name] = (K._relu_encode_fwd_kernel, signature, constexprs, warps, stages)
        grad_cfg = dict(K.RELU_GRAD_CONFIG)
        grad_warps = grad_cfg.pop("num_warps")
        grad_signature = dict(grad_ptr=ptr, acts_ptr=ptr, out_ptr=ptr, n_tokens="i32", n_latents="i32",
                              stride_gm="i32", stride_gn="i32")
        cases[f"relu_grad-{name}"] = (K._relu_grad_kernel, grad_signature, grad_cfg, grad_warps, 1)
    return cases


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_kernel_compiles(compile_reports, arch, dtype):
    check_compile_report(compile_reports[f"{arch}-{dtype}"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_relu_grad_kernel_compiles(compile_reports, arch, dtype):
    check_compile_report(compile_reports[f"{arch}-relu_grad-{dtype}"])


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("sparse_backward", [False, True, None], ids=["dense_bwd", "sparse_bwd", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["dense_code", "sparse_code"])
def test_gpu_matches_reference(dtype, sparse_backward, bias_shift):
    x, W, b = make_inputs(512, 768, 24576, dtype, device="cuda", bias_shift=bias_shift)
    check(x, W, b, dtype, sparse_backward)
