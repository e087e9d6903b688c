"""Tests of kernels/sparse_decoder.py against fastsae.ops.sparse_decoder's references.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes are small; fp32 and fp16 only there (bf16 tl math is checked on a GPU, tests marked
gpu). Ground truth is the reference on fp32 copies of the inputs; the kernel in fp16 is held to
an fp16-sized tolerance.
"""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_DEVICE, needs_triton
from fastsae.ops import dense_decode, sparse_decode
from fastsae.ops.sparse_decoder import SparseDecodeReference

pytestmark = needs_triton

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
              torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
CPU_DTYPES = [torch.float32, torch.float16]


def kernels():
    from fastsae.kernels import sparse_decoder

    return sparse_decoder


def make_code(n_tokens, k, n_latents, d, dtype, device=KERNEL_DEVICE):
    values = torch.randn(n_tokens, k, device=device).to(dtype)
    indices = torch.stack([torch.randperm(n_latents, device=device)[:k] for _ in range(n_tokens)])
    W_dec = (torch.randn(n_latents, d, device=device) / d**0.5).to(dtype)
    b_dec = torch.randn(d, device=device).to(dtype)
    return values, indices, W_dec, b_dec


def run_with_grads(fn, values, indices, W_dec, b_dec, grad_out, *, upcast=False):
    """fn's output and the gradients of (values, W_dec, b_dec) for grad_out, on fresh leaves."""
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    leaves = [cast(t).detach().requires_grad_() for t in (values, W_dec, b_dec)]
    out = fn(leaves[0], indices, leaves[1], leaves[2])
    out.backward(cast(grad_out))
    return out.detach(), [leaf.grad for leaf in leaves]


def check_against_reference(values, indices, W_dec, b_dec, fn=None):
    """Kernel output and gradients vs the fp32 reference's autograd, at the dtype's tolerance."""
    fn = fn or (lambda v, i, w, b: sparse_decode(v, i, w, b, backend="triton"))
    grad_out = torch.randn(*values.shape[:-1], W_dec.shape[1], device=values.device).to(W_dec.dtype)
    out, grads = run_with_grads(fn, values, indices, W_dec, b_dec, grad_out)
    ref_fn = lambda v, i, w, b: SparseDecodeReference.apply(v.reshape(-1, v.shape[-1]), i.reshape(-1, i.shape[-1]),
                                                          w, b).reshape(*v.shape[:-1], w.shape[1])
    ref_out, ref_grads = run_with_grads(ref_fn, values, indices, W_dec, b_dec, grad_out, upcast=True)
    tol = TOLERANCES[W_dec.dtype]
    assert out.dtype == W_dec.dtype
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for name, grad, ref_grad, leaf in zip(("values", "W_dec", "b_dec"), grads, ref_grads, (values, W_dec, b_dec)):
        assert grad.dtype == leaf.dtype, name
        torch.testing.assert_close(grad.float(), ref_grad, **tol, msg=lambda m: f"grad {name}: {m}")
    return out, grads


# --------------------------------------------------------------------------------------------
# sparse_decode: values and gradients

# (N, k, n, d): k not a multiple of 8 or of the 4-slot unroll, d not a power of two, n not a
# multiple of the 4-latent backward tile; d = 300 spans two 256-column blocks (partial dots).
SHAPES = [(37, 5, 301, 96), (1, 1, 50, 33), (20, 13, 97, 200), (9, 3, 40, 300)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-k{}-n{}-d{}".format(*s))
def test_matches_reference(shape, dtype):
    check_against_reference(*make_code(*shape, dtype))


def test_direct_kernel_call_and_batch_dims():
    values, indices, W_dec, b_dec = make_code(12, 6, 70, 40, torch.float32)
    check_against_reference(values, indices, W_dec, b_dec, fn=kernels().sparse_decode_triton)
    # The op flattens leading dimensions before dispatch; int32 indices are widened there.
    check_against_reference(values.view(3, 4, 6), indices.view(3, 4, 6).int(), W_dec, b_dec)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_repeated_latent_in_one_token_sums(dtype):
    values, indices, W_dec, b_dec = make_code(11, 6, 50, 40, dtype)
    indices[:, 1] = indices[:, 0]
    indices[:, 5] = indices[:, 0]  # three slots of one token on one latent
    out, _ = check_against_reference(values, indices, W_dec, b_dec)
    t = 3
    by_hand = b_dec.float() + sum(values[t, j].float() * W_dec[indices[t, j]].float() for j in range(6))
    torch.testing.assert_close(out[t].float(), by_hand, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("hot_pairs, hot_slots", [(256, 32), (16, 32), (16, 1)],
                         ids=["segments", "dense-hot-path", "one-hot-slot"])
def test_hot_latent_every_token(dtype, hot_pairs, hot_slots, monkeypatch):
    # Every token on latent 0 (8 steps of the 8-pair backward tile), every token on latent 1 (one
    # of them twice), the rest spread. With the hot threshold lowered, latents 0 and 1 take the
    # dense hot-latent path (both, or only the busiest with one slot) instead of the segment walk.
    monkeypatch.setattr(kernels(), "HOT_LATENT_PAIRS", hot_pairs)
    monkeypatch.setattr(kernels(), "HOT_LATENT_SLOTS", hot_slots)
    values, indices, W_dec, b_dec = make_code(64, 4, 20, 24, dtype)
    indices[:, 0] = 0
    indices[:, 1] = 1
    indices[:, 2:] = torch.randint(2, 20, (64, 2), device=indices.device)
    indices[5, 3] = 1  # latent 1: 65 pairs, latent 0: 64, others far fewer than 16
    values[7, 0] = 0.0
    hot = kernels().find_hot_latents(indices, 20)
    expected_hot_pairs = 0 if hot_pairs == 256 else (129 if hot_slots > 1 else 65)
    assert int(hot.pair_is_hot.sum()) == expected_hot_pairs
    check_against_reference(values, indices, W_dec, b_dec)
    # dense_decode's backward (grad_W only, zero values skipped) on the same code
    acts = torch.zeros(64, 20, device=indices.device).to(dtype)
    acts.scatter_add_(1, indices, values)
    check_dense_decode(acts, W_dec, b_dec, kernels().dense_decode_triton)


def test_zero_values_still_get_value_gradients():
    values, indices, W_dec, b_dec = make_code(16, 5, 60, 48, torch.float32)
    values[:, 2:] = 0.0  # the forward skips these rows' gathers; their gradient is not zero
    values[3] = 0.0
    _, (grad_values, grad_W, _) = check_against_reference(values, indices, W_dec, b_dec)
    assert grad_values[:, 2:].abs().min() > 0
    # latents touched only by zero values get a zero gradient row
    only_zero = set(indices[values == 0].tolist()) - set(indices[values != 0].tolist())
    assert only_zero
    for latent in only_zero:
        assert torch.count_nonzero(grad_W[latent]) == 0


def test_untouched_latents_get_zero_rows_and_partial_grads():
    values, indices, W_dec, b_dec = make_code(8, 2, 45, 20, torch.float32)
    untouched = torch.ones(45, dtype=torch.bool)
    untouched[indices.flatten()] = False
    # W frozen: only values and b_dec need gradients, and vice versa
    v = values.clone().requires_grad_()
    out = kernels().sparse_decode_triton(v, indices, W_dec, b_dec)
    out.sum().backward()
    ref = SparseDecodeReference.apply(values.clone().requires_grad_(), indices, W_dec, b_dec)
    torch.testing.assert_close(out, ref)
    w = W_dec.clone().requires_grad_()
    kernels().sparse_decode_triton(values, indices, w, b_dec).sum().backward()
    assert w.grad is not None and torch.count_nonzero(w.grad[untouched]) == 0
    assert torch.count_nonzero(w.grad[~untouched].abs().sum(1)) == int((~untouched).sum())
    assert v.grad is not None and v.grad.shape == values.shape


def test_float64_refused_and_empty_codes_run_the_kernels():
    values, indices, W_dec, b_dec = make_code(5, 3, 30, 16, torch.float64)
    # The op refuses float64 when Triton is forced (fastsae.ops._backend), and so does the
    # kernel's own entry point (the kernels import nothing from fastsae.ops, reference included).
    with pytest.raises(TypeError, match="float64"):
        sparse_decode(values, indices, W_dec, b_dec, backend="triton")
    with pytest.raises(TypeError, match="W_dec must be float32/float16/bfloat16, got torch.float64"):
        kernels().sparse_decode_triton(values, indices, W_dec, b_dec)
    empty = sparse_decode(values[:0].float(), indices[:0], W_dec.float(), b_dec.float(), backend="triton")
    assert empty.shape == (0, 16)
    # k = 0: every token decodes to b_dec; the gradients are those of the reference (zeros for W_dec)
    leaves = [t.float().requires_grad_() for t in (values[:, :0], W_dec, b_dec)]
    out = kernels().sparse_decode_triton(leaves[0], indices[:, :0], leaves[1], leaves[2])
    torch.testing.assert_close(out, b_dec.float().expand(5, 16), atol=0, rtol=0)
    out.sum().backward()
    assert leaves[0].grad.shape == (5, 0) and bool((leaves[1].grad == 0).all())
    torch.testing.assert_close(leaves[2].grad, torch.full((16,), 5.0, device=KERNEL_DEVICE))


def test_kernels_import_nothing_from_ops():
    """kernels/ sits below fastsae.ops (the GUIDE's layers): no kernel module imports it."""
    import ast
    from pathlib import Path

    kernel_dir = Path(kernels().__file__).parent
    for path in sorted(kernel_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("fastsae.ops", "fastsae.sae", "fastsae.model", "fastsae.train")), \
                    f"{path.name} imports {name}"


def test_errors():
    values, indices, W_dec, b_dec = make_code(4, 3, 30, 16, torch.float32)
    with pytest.raises(ValueError, match="indices must have the shape"):
        sparse_decode(values, indices[:, :2], W_dec, b_dec, backend="triton")
    with pytest.raises(ValueError, match="indices must lie in"):
        sparse_decode(values, indices + 30, W_dec, b_dec, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        sparse_decode(values.half(), indices, W_dec, b_dec, backend="triton")
    with pytest.raises(TypeError, match="int64 or int32"):
        sparse_decode(values, indices.float(), W_dec, b_dec, backend="triton")
    with pytest.raises(ValueError, match="b_dec must have shape"):
        sparse_decode(values, indices, W_dec, b_dec[:-1], backend="triton")
    with pytest.raises(ValueError, match="backend"):
        sparse_decode(values, indices, W_dec, b_dec, backend="cuda")


def test_sort_pairs_by_latent_segments():
    indices = torch.tensor([[3, 0], [3, 3], [1, 0]])
    sorted_pairs, segment_start = kernels().sort_pairs_by_latent(indices, 5)
    assert segment_start.tolist() == [0, 2, 3, 3, 6, 6]
    assert sorted_pairs.tolist() == [1, 5, 4, 0, 2, 3]  # stable: token order within a latent
    skip = torch.tensor([[False, True], [False, False], [True, False]])
    sorted_pairs, segment_start = kernels().sort_pairs_by_latent(indices, 5, skip=skip)
    assert segment_start.tolist() == [0, 1, 1, 1, 4, 4]
    assert sorted_pairs[:4].tolist() == [5, 0, 2, 3]


# --------------------------------------------------------------------------------------------
# dense_decode: sparse path and dense path


def dense_code(n_tokens, n_latents, active_per_row, dtype):
    acts = torch.zeros(n_tokens, n_latents, device=KERNEL_DEVICE)
    for t in range(n_tokens):
        chosen = torch.randperm(n_latents, device=KERNEL_DEVICE)[:active_per_row[t % len(active_per_row)]]
        acts[t, chosen] = torch.rand(len(chosen), device=KERNEL_DEVICE) + 0.1
    return acts.to(dtype)


def autograd_nodes(out) -> str:
    """Names of the autograd nodes behind out (through the op's reshape), to see which path ran."""
    names, node = [], out.grad_fn
    while node is not None:
        names.append(type(node).__name__)
        node = next((f for f, _ in node.next_functions if f is not None), None)
    return " ".join(names)


def check_dense_decode(acts, W_dec, b_dec, fn):
    grad_out = torch.randn(acts.shape[0], W_dec.shape[1], device=acts.device).to(W_dec.dtype)
    leaves = [t.detach().requires_grad_() for t in (acts, W_dec, b_dec)]
    out = fn(*leaves)
    out.backward(grad_out)
    ref_leaves = [t.detach().float().requires_grad_() for t in (acts, W_dec, b_dec)]
    torch.addmm(ref_leaves[2], ref_leaves[0], ref_leaves[1]).backward(grad_out.float())
    tol = TOLERANCES[W_dec.dtype]
    torch.testing.assert_close(out.detach().float(), torch.addmm(*[t.float() for t in (b_dec, acts, W_dec)]), **tol)
    for name, leaf, ref in zip(("acts", "W_dec", "b_dec"), leaves, ref_leaves):
        assert leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad.float(), ref.grad, **tol, msg=lambda m: f"grad {name}: {m}")
    return out, leaves


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_dense_decode_sparse_path(dtype):
    # rows of 0 to 6 nonzeros (padding to 6 with zeros), n not a multiple of 4, d not a power of 2
    acts = dense_code(19, 203, [3, 0, 6, 1], dtype)
    _, W_dec, b_dec = make_code(1, 1, 203, 72, dtype)[1:]
    out, (acts_leaf, *_) = check_dense_decode(acts, W_dec, b_dec, kernels().dense_decode_triton)
    assert "DenseDecodeSparseFunction" in autograd_nodes(out)
    # grad_acts is dense: nonzero where acts is zero too (grad_out @ W_dec^T at every latent)
    assert torch.count_nonzero(acts_leaf.grad[acts == 0]) > 0.9 * int((acts == 0).sum())


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_dense_decode_rows_beyond_capacity(monkeypatch, dtype):
    """Rows with more nonzeros than the compact code's C slots are decoded (and their grad_W_dec
    summed) by the dense-row kernels, beside the compact rows, with no host sync to choose:
    mixed codes, an all-zero code, a fully dense one with negative entries."""
    from fastsae.kernels import _sparse_code  # sparse_capacity reads these

    monkeypatch.setattr(_sparse_code, "SPARSE_MIN_CAPACITY", 4)
    monkeypatch.setattr(_sparse_code, "SPARSE_CAPACITY_FRACTION", 0.0)
    k = kernels()
    _, W_dec, b_dec = make_code(1, 1, 150, 40, dtype)[1:]
    mixed = dense_code(23, 150, [0, 2, 4, 9, 60, 5], dtype)
    fully_dense = torch.randn(9, 150, device=KERNEL_DEVICE).to(dtype)
    for acts in (mixed, torch.zeros(5, 150, device=KERNEL_DEVICE, dtype=dtype), fully_dense):
        out, _ = check_dense_decode(acts, W_dec, b_dec, lambda a, w, b: dense_decode(a, w, b, backend="triton"))
        assert "DenseDecodeSparseFunction" in autograd_nodes(out)
    _, _, dense = k.compact_dense_code(mixed)
    assert dense.n_rows.tolist() == [int(((mixed != 0).sum(1) > 4).sum())] and dense.n_rows.item() > 0


def test_dense_decode_grad_w_is_rounded_once(monkeypatch):
    """fp16 grad_W_dec of latents that compact rows and dense rows share: one fp32 sum, one
    rounding. Here the compact rows' part nearly cancels the dense row's, so a sum rounded to fp16
    in between (the old path) was off by up to hundreds of ulp of the result."""
    from fastsae.kernels import _sparse_code  # sparse_capacity reads these

    monkeypatch.setattr(_sparse_code, "SPARSE_MIN_CAPACITY", 4)
    monkeypatch.setattr(_sparse_code, "SPARSE_CAPACITY_FRACTION", 0.0)
    n_latents, d = 40, 16
    g = torch.Generator().manual_seed(3)
    acts = torch.zeros(3, n_latents)
    acts[0, :4] = 1.1 + torch.rand(4, generator=g)  # compact rows (4 latents each)
    acts[1, :4] = 0.7 + torch.rand(4, generator=g)
    acts[2] = 1.0 + torch.rand(n_latents, generator=g)  # a dense row: all 40 latents
    grad_out = torch.randn(3, d, generator=g)
    # The dense row's contribution to latents 0..3 cancels the compact rows' to ~1e-3 of it.
    partial = acts[:2, :4].t() @ grad_out[:2]  # [4, d]
    grad_out[2] = -(partial[0] / acts[2, 0]) * (1 + 1e-3)
    acts, grad_out = acts.half().to(KERNEL_DEVICE), grad_out.half().to(KERNEL_DEVICE)
    W_dec = torch.randn(n_latents, d, generator=g).half().to(KERNEL_DEVICE).requires_grad_()
    b_dec = torch.zeros(d, dtype=torch.float16, device=KERNEL_DEVICE)
    dense_decode(acts, W_dec, b_dec, backend="triton").backward(grad_out)
    exact = acts.double().t() @ grad_out.double()  # fp64 of the fp16 inputs
    ulp = (exact.abs().log2().floor() - 10).exp2()  # of an fp16 number of that size
    error_ulps = (W_dec.grad.double() - exact).abs() / ulp
    assert float(error_ulps.max()) <= 1.0, error_ulps.max(dim=1).values


def test_dense_decode_errors():
    _, W_dec, b_dec = make_code(1, 1, 30, 16, torch.float32)[1:]
    with pytest.raises(ValueError, match="n_latents=30"):
        dense_decode(torch.zeros(4, 31), W_dec, b_dec, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        dense_decode(torch.zeros(4, 30, dtype=torch.float16), W_dec, b_dec, backend="triton")


# --------------------------------------------------------------------------------------------
# Empty batch, host syncs, int64 offsets


def empty_batch_grads(fn, leaves, d):
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad],
                                torch.ones(*out.shape[:-1], d, device=out.device, dtype=out.dtype))
    return out, grads


@pytest.mark.parametrize("leading", [(0,), (2, 0)], ids=["N0", "2x0"])
def test_empty_batch_matches_reference(leading):
    """N = 0 through every entry point: empty outputs, zero grad_W_dec / grad_b_dec, as the
    reference gives, whether the op routes it or the autograd functions get it directly."""
    k = kernels()
    _, _, W_dec, b_dec = make_code(1, 4, 50, 16, torch.float32)
    values = torch.randn(*leading, 4, device=KERNEL_DEVICE)
    indices = torch.zeros(*leading, 4, dtype=torch.int64, device=KERNEL_DEVICE)
    acts = torch.zeros(*leading, 50, device=KERNEL_DEVICE)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    cases = [
        (lambda v, w, b: sparse_decode(v, indices, w, b, backend="triton"),
         lambda v, w, b: sparse_decode(v, indices, w, b, backend="torch"), values),
        (lambda a, w, b: dense_decode(a, w, b, backend="triton"),
         lambda a, w, b: dense_decode(a, w, b, backend="torch"), acts),
    ]
    if len(leading) == 1:  # the kernels' autograd functions take 2-D codes
        cases += [
            (lambda v, w, b: k.SparseDecodeFunction.apply(v, indices, w, b),
             lambda v, w, b: SparseDecodeReference.apply(v, indices, w, b), values),
            (lambda a, w, b: k.DenseDecodeSparseFunction.apply(a, w, b),
             lambda a, w, b: torch.addmm(b, a, w), acts),
            (lambda a, w, b: k.dense_decode_triton(a, w, b),
             lambda a, w, b: torch.addmm(b, a, w), acts),
        ]
    for fn, ref_fn, code in cases:
        out, grads = empty_batch_grads(fn, [leaf(code), leaf(W_dec), leaf(b_dec)], 16)
        ref_out, ref_grads = empty_batch_grads(ref_fn, [leaf(code), leaf(W_dec), leaf(b_dec)], 16)
        assert out.shape == ref_out.shape == (*leading, 16) and out.dtype == ref_out.dtype
        for g, r in zip(grads, ref_grads):
            assert g.shape == r.shape and g.dtype == r.dtype
            torch.testing.assert_close(g, r, atol=0, rtol=0)
    grad_values, grad_W = k.sparse_decode_backward(torch.zeros(0, 16), values.reshape(0, 4),
                                                   indices.reshape(0, 4), W_dec,
                                                   need_grad_values=True, need_grad_W=True)
    assert grad_values.shape == (0, 4) and bool((grad_W == 0).all())


@pytest.mark.parametrize("hot_pairs", [256, 8], ids=["segments", "hot-path"])
def test_backward_prepass_has_no_bincount(hot_pairs, monkeypatch):
    """torch.bincount syncs with the host on CUDA (it reads max(input) to size its output, even
    with minlength): the backward's pre-pass must not use it. (On a GPU,
    test_gpu_backward_has_no_host_sync checks the sync itself.)"""
    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount syncs with the host on CUDA")

    monkeypatch.setattr(torch, "bincount", no_bincount)
    monkeypatch.setattr(kernels(), "HOT_LATENT_PAIRS", hot_pairs)
    values, indices, W_dec, b_dec = make_code(16, 4, 30, 24, torch.float32)
    indices[:, 0] = 0  # 16 pairs on latent 0: hot when HOT_LATENT_PAIRS = 8
    check_against_reference(values, indices, W_dec, b_dec)


def test_sort_pairs_by_latent_edge_cases():
    """Empty code; every pair skipped; latents at both ends; int32 indices."""
    k = kernels()
    pairs, starts = k.sort_pairs_by_latent(torch.zeros(0, 3, dtype=torch.int64), 4)
    assert pairs.numel() == 0 and starts.tolist() == [0] * 5 and starts.dtype == torch.int32
    indices = torch.tensor([[4, 0], [0, 4]], dtype=torch.int32)
    pairs, starts = k.sort_pairs_by_latent(indices, 5, skip=torch.ones(2, 2, dtype=torch.bool))
    assert starts.tolist() == [0] * 6
    pairs, starts = k.sort_pairs_by_latent(indices, 5)
    assert starts.tolist() == [0, 2, 2, 2, 2, 4] and pairs.tolist() == [1, 2, 0, 3]
    hot = k.find_hot_latents(indices, 5)
    assert hot.latents.shape == (5,) and set(hot.latents[:2].tolist()) == {0, 4}


def test_far_apart_decoder_rows():
    """W_dec rows FAR = 2^31 - 4096 elements apart (latent * stride_w passes 2^31 from latent 2):
    the kernels' int64 offsets read the right rows. 8 GiB of fp16 that torch.empty only
    reserves; a few pages get touched."""
    far = 2**31 - 4096
    values, indices, _, b_dec = make_code(6, 2, 3, 16, torch.float16)
    storage = torch.empty(8192 + 2 * far + 16, dtype=torch.float16, device=KERNEL_DEVICE)
    storage[:8192 + 16].zero_()
    W_dec = storage.as_strided((3, 16), (far, 1), 8192)
    W_dec.copy_(torch.randn(3, 16, device=KERNEL_DEVICE).half())
    fn = lambda v, i, w, b: kernels().SparseDecodeFunction.apply(v, i, w, b)  # noqa: E731
    check_against_reference(values, indices, W_dec, b_dec, fn=fn)


# --------------------------------------------------------------------------------------------
# GPU: bf16 and larger shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1000, 32, 24_576, 768), (333, 17, 5_003, 1_000), (1, 1, 64, 7)],
                         ids=lambda s: "N{}-k{}-n{}-d{}".format(*s))
def test_gpu_matches_reference(shape, dtype):
    check_against_reference(*make_code(*shape, dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_hot_latents_and_repeats(dtype):
    values, indices, W_dec, b_dec = make_code(2048, 16, 4096, 512, dtype, device="cuda")
    indices[:, 0] = 0
    indices[:, 1] = indices[:, 2]
    check_against_reference(values, indices, W_dec, b_dec)


@pytest.mark.gpu
def test_gpu_backward_has_no_host_sync():
    """The backward's torch pre-pass (sort, segment starts, hot latents) never waits on the GPU."""
    values, indices, W_dec, b_dec = make_code(2048, 16, 4096, 512, torch.bfloat16, device="cuda")
    indices[:, 0] = 0  # a hot latent: the dense hot path runs too
    grad_out = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    kernels().sparse_decode_backward(grad_out, values, indices, W_dec, need_grad_values=True, need_grad_W=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels().sparse_decode_backward(grad_out, values, indices, W_dec, need_grad_values=True, need_grad_W=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_dense_decode(dtype):
    acts = dense_code(512, 8192, [8, 30, 0, 16], dtype).cuda()
    _, W_dec, b_dec = make_code(1, 1, 8192, 768, dtype, device="cuda")[1:]
    out, _ = check_dense_decode(acts, W_dec, b_dec, lambda a, w, b: dense_decode(a, w, b, backend="triton"))
    assert "DenseDecodeSparseFunction" in autograd_nodes(out)


@pytest.mark.gpu
@pytest.mark.parametrize("active_per_row", [[8, 30, 0, 16], [600]], ids=["compact_rows", "dense_rows"])
def test_gpu_dense_decode_has_no_host_sync(active_per_row):
    """dense_decode's forward and backward (compaction, dense-row list, both kernels) never
    wait on the GPU, whether the rows fit the compact code or not."""
    acts = dense_code(512, 8192, active_per_row, torch.bfloat16).cuda().requires_grad_()
    _, W_dec, b_dec = make_code(1, 1, 8192, 768, torch.bfloat16, device="cuda")[1:]
    W_dec.requires_grad_()
    grad_out = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    dense_decode(acts, W_dec, b_dec, backend="triton").backward(grad_out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dense_decode(acts, W_dec, b_dec, backend="triton").backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
