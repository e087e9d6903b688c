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


# ------------------------------------------------------------------ compile checks (sm_80, sm_90)

# The sparse backward's kernels are those of kernels/topk_encoder.py, compile-checked in
# tests/test_topk_encoder.py.
def compile_cases():
    """The forward kernel at its shipped config per dtype (tests/compile_check.py)."""
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
    return cases


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_kernel_compiles(compile_reports, arch, dtype):
    check_compile_report(compile_reports[f"{arch}-{dtype}"])


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("sparse_backward", [False, True, None], ids=["dense_bwd", "sparse_bwd", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bias_shift", [0.0, -3.0], ids=["dense_code", "sparse_code"])
def test_gpu_matches_reference(dtype, sparse_backward, bias_shift):
    x, W, b = make_inputs(512, 768, 24576, dtype, device="cuda", bias_shift=bias_shift)
    check(x, W, b, dtype, sparse_backward)
