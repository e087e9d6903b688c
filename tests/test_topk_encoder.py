"""Fused TopK encoder (kernels/topk_encoder.py) against TopKEncodeReference.

On CPU the kernels run under Triton's interpreter (small shapes, fp32 and fp16); GPU tests add
bf16 and the issue's shapes. The compile checks for sm_80 / sm_90 are in tests/test_compile.py.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_triton
from helpers_encoders import DTYPES, TOL, make_inputs

from fastsae import ops
from fastsae.ops._sparse import gather_rows_weighted, scatter_rows_weighted
from fastsae.ops.topk_encoder import TopKEncodeReference

pytestmark = needs_triton

tk = pytest.importorskip("fastsae.kernels.topk_encoder")


def exact_pre(x, W, b):
    """fp64 pre-activations of the given (possibly low-precision) inputs."""
    return x.double() @ W.double() + b.double()


def assert_valid_topk(x, W, b, k, values, indices):
    """values/indices are a correct TopK(ReLU(.)) of the exact pre-activations, up to rounding.

    Exact-arithmetic criteria, tolerant only where rounding can reorder near-ties: indices unique
    per row; values sorted largest first and equal to ReLU(pre[indices]); every chosen latent's
    pre-activation is at least the true k-th largest (minus rounding).
    """
    pre = exact_pre(x, W, b)
    scale = pre.abs().max().item() + 1e-6
    tol = TOL[x.dtype] * scale
    assert values.shape == indices.shape == (x.shape[0], k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert bool((indices.sort(dim=1).values.diff(dim=1) > 0).all()), "repeated latent in a row"
    v = values.double()
    assert bool((v.diff(dim=1) <= tol).all()), "values not sorted largest first"
    chosen = pre.gather(1, indices)
    torch.testing.assert_close(v, chosen.clamp_min(0), atol=tol, rtol=0)
    kth = pre.topk(k, dim=1).values[:, -1:]
    assert bool((chosen >= kth - tol).all()), "a chosen latent is below the k-th largest"


def dense_grad_reference(x, W, b, indices, grad_values):
    """Autograd gradients of ReLU(pre[indices]) in fp64 for a given selection."""
    x64, W64, b64 = (t.detach().double().requires_grad_() for t in (x, W, b))
    values = torch.relu((x64 @ W64 + b64).gather(1, indices))
    return torch.autograd.grad((values * grad_values.double()).sum(), (x64, W64, b64))


def assert_grads_close(got, expected, dtype):
    for name, g, e in zip(("x", "W_enc", "b_enc"), got, expected):
        scale = e.abs().max().item() + 1e-6
        torch.testing.assert_close(g.double(), e, atol=TOL[dtype] * scale * 4, rtol=0, msg=name)


SHAPES = [  # (N, d, n, k): d not a power of two, n not a multiple of the tile, N=1, odd k
    (1, 16, 100, 1),
    (5, 40, 300, 13),
    (17, 96, 257, 5),
    (33, 33, 300, 32),
    (8, 24, 200, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-d{}-n{}-k{}".format(*s))
def test_forward_and_grads_match_reference(shape, dtype):
    n_tokens, d_in, n_latents, k = shape
    x, W, b = make_inputs(n_tokens, d_in, n_latents, dtype, bias_shift=-0.5)
    for t in (x, W, b):
        t.requires_grad_()
    values, indices = ops.topk_encode(x, W, b, k, backend="triton")
    assert_valid_topk(x, W, b, k, values, indices)

    ref_values, ref_indices = TopKEncodeReference.apply(x, W, b, k)
    torch.testing.assert_close(values.double(), ref_values.double(),
                               atol=TOL[dtype] * (ref_values.abs().max().item() + 1), rtol=0)
    if dtype == torch.float32:  # fp32 random data has no near-ties: the same sets
        assert torch.equal(indices.sort(1).values, ref_indices.sort(1).values)

    grad_values = torch.randn_like(values)
    got = torch.autograd.grad((values * grad_values).sum(), (x, W, b))
    assert_grads_close(got, dense_grad_reference(x, W, b, indices, grad_values), dtype)
    if dtype == torch.float32:
        expected = torch.autograd.grad((ref_values * grad_values).sum(), (x, W, b))
        assert_grads_close(got, [e.double() for e in expected], dtype)


@pytest.mark.parametrize("splits", [1, 2, 3, 50])
def test_latent_splits(splits):
    x, W, b = make_inputs(9, 24, 300, torch.float32)
    values, indices = tk.topk_encode_triton(x, W, b, 7, splits=splits)
    assert_valid_topk(x, W, b, 7, values, indices)
    ref_values, ref_indices = TopKEncodeReference.apply(x, W, b, 7)
    assert torch.equal(indices.sort(1).values, ref_indices.sort(1).values)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_k_equals_n_latents(dtype):
    x, W, b = make_inputs(3, 20, 100, dtype)
    values, indices = ops.topk_encode(x, W, b, 100, backend="triton")
    assert_valid_topk(x, W, b, 100, values, indices)
    assert torch.equal(indices.sort(1).values, torch.arange(100).expand(3, 100))


def test_k_beyond_fused_limit_takes_unfused_path():
    k = tk.MAX_FUSED_K + 88  # K_PAD above the largest fused config
    x, W, b = make_inputs(2, 16, k + 50, torch.float32)
    for t in (x, W, b):
        t.requires_grad_()
    values, indices = ops.topk_encode(x, W, b, k, backend="triton")
    assert_valid_topk(x, W, b, k, values, indices)
    grad_values = torch.randn_like(values)
    got = torch.autograd.grad((values * grad_values).sum(), (x, W, b))
    assert_grads_close(got, dense_grad_reference(x, W, b, indices, grad_values), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_from_duplicate_columns(dtype):
    x, W, b = make_inputs(6, 32, 150, dtype)
    W[:, 1::2] = W[:, 0:-1:2]  # latent 2j+1 is a copy of latent 2j: every score is tied
    b[1::2] = b[0:-1:2]
    k = 9  # odd: one tie is split at the k-th place
    values, indices = ops.topk_encode(x, W, b, k, backend="triton")
    assert_valid_topk(x, W, b, k, values, indices)
    ref_values, _ = TopKEncodeReference.apply(x, W, b, k)
    torch.testing.assert_close(values.double(), ref_values.double(),
                               atol=TOL[dtype] * (ref_values.abs().max().item() + 1), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_negative_preactivations(dtype):
    x, W, b = make_inputs(5, 24, 130, dtype, bias_shift=-50.0)
    for t in (x, W, b):
        t.requires_grad_()
    values, indices = ops.topk_encode(x, W, b, 6, backend="triton")
    assert bool((values == 0).all())
    assert_valid_topk(x, W, b, 6, values, indices)  # indices: the 6 largest negative scores
    got = torch.autograd.grad(values.sum(), (x, W, b))
    assert all(bool((g == 0).all()) for g in got)


def test_leading_dimensions_and_no_grad_inputs():
    x, W, b = make_inputs(12, 16, 90, torch.float32)
    W.requires_grad_()
    values, indices = ops.topk_encode(x.view(3, 4, 16), W, b, 4, backend="triton")
    assert values.shape == indices.shape == (3, 4, 4)
    (grad_w,) = torch.autograd.grad(values.sum(), (W,))
    ref_values, _ = TopKEncodeReference.apply(x, W, b, 4)
    (ref_grad_w,) = torch.autograd.grad(ref_values.sum(), (W,))
    torch.testing.assert_close(grad_w, ref_grad_w, atol=1e-5, rtol=0)


def test_strided_bias():
    """b_enc a strided view (every other entry of a longer tensor): read at its stride."""
    x, W, _ = make_inputs(12, 16, 90, torch.float32)
    b = torch.randn(180, device=x.device)[::2]
    values, indices = ops.topk_encode(x, W, b, 5, backend="triton")
    ref_values, ref_indices = TopKEncodeReference.apply(x, W, b, 5)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=0)
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_backward_kernels_directly(dtype):
    """sparse_encoder_backward against the reference's sparse-dense helpers, with zeros and
    repeated latents across tokens (the segmented reduction's hard cases)."""
    n_tokens, d_in, n_latents, k = 21, 40, 150, 6
    x, W, _ = make_inputs(n_tokens, d_in, n_latents, dtype)
    indices = torch.randint(0, 20, (n_tokens, k), device=KERNEL_DEVICE)  # dense hits on 20 latents
    indices[::3] = torch.randint(0, n_latents, (len(indices[::3]), k), device=KERNEL_DEVICE)
    grad = torch.randn(n_tokens, k, device=KERNEL_DEVICE).to(dtype)
    grad[:, 0] = 0
    grad_x, grad_w, grad_b = tk.sparse_encoder_backward(grad, indices, x, W, True, True, True)
    tol = TOL[dtype] * 4
    ref_x = gather_rows_weighted(grad.float(), indices, W.t().float())
    ref_w = scatter_rows_weighted(grad.float(), indices, x.float(), n_latents).t()
    ref_b = torch.zeros(n_latents).index_add_(0, indices.reshape(-1), grad.float().reshape(-1))
    for got, ref in ((grad_x, ref_x), (grad_w, ref_w), (grad_b, ref_b)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref, atol=tol * (ref.abs().max().item() + 1), rtol=0)
    # Only some gradients requested: the others are None, the bias alone still right.
    none_x, none_w, only_b = tk.sparse_encoder_backward(grad, indices, x, W, False, False, True)
    assert none_x is None and none_w is None
    torch.testing.assert_close(only_b, grad_b)


def test_errors():
    x, W, b = make_inputs(4, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_encode(x, W, b, 0, backend="triton")
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_encode(x, W, b, 51, backend="triton")
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk_encode(x, W, b, 2.0, backend="triton")
    with pytest.raises(ValueError, match="last dimension"):
        ops.topk_encode(x[:, :15], W, b, 3, backend="triton")
    with pytest.raises(ValueError, match="b_enc must have shape"):
        ops.topk_encode(x, W, b[:-1], 3, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        ops.topk_encode(x.half(), W, b, 3, backend="triton")


# ------------------------------------------------------------------ NaN, layouts of W_enc

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_preactivations_surface_as_torch_topk(dtype):
    """torch.topk ranks NaN above +inf above every finite value; the kernel's selection does too,
    and the NaN comes out as the value (ReLU keeps it), with no gradient through it."""
    x, W, b = make_inputs(7, 24, 200, dtype)
    W[:, 150] = float("nan")  # latent 150: NaN for every token
    b[37] = float("inf")  # latent 37: +inf for every token
    x[5] = float("nan")  # token 5: every pre-activation NaN
    for t in (x, W, b):
        t.requires_grad_()
    k = 6
    values, indices = ops.topk_encode(x, W, b, k, backend="triton")
    ref_values, ref_indices = TopKEncodeReference.apply(x, W, b, k)
    finite_rows = [0, 1, 2, 3, 4, 6]
    assert bool((indices[finite_rows, 0] == 150).all()) and bool(values[finite_rows, 0].isnan().all())
    assert bool((indices[finite_rows, 1] == 37).all()) and bool((values[finite_rows, 1] == float("inf")).all())
    assert torch.equal(indices[finite_rows, :2], ref_indices[finite_rows, :2])
    if dtype == torch.float32:
        assert torch.equal(indices[finite_rows].sort(1).values, ref_indices[finite_rows].sort(1).values)
    torch.testing.assert_close(values[finite_rows, 2:].double(), ref_values[finite_rows, 2:].double(),
                               atol=TOL[dtype] * (ref_values[finite_rows, 2:].abs().max().item() + 1), rtol=0)
    # The all-NaN token: k distinct latents, all NaN.
    assert bool(values[5].isnan().all()) and indices[5].unique().numel() == k
    # No gradient flows through NaN values (values > 0 is False), as in the reference.
    got = torch.autograd.grad(values[[0, 1]].nan_to_num(0).sum(), (x, W, b))
    assert got[1][:, 150].abs().sum() == 0 and got[2][150] == 0
    (ref_grad_b,) = torch.autograd.grad(ref_values[[0, 1]].nan_to_num(0).sum(), (b,))
    torch.testing.assert_close(got[2], ref_grad_b, atol=0, rtol=0)


def test_nan_token_reaches_only_its_own_latents_weight_gradient():
    """A NaN in one token's x: the reference's grad_W_enc is NaN at that token's k latents only
    (0 * NaN per selected entry); the segmented kernel's tensor-core tile used to spread it over
    the 64 latents of every block holding one of them."""
    x, W, b = make_inputs(9, 24, 300, torch.float32)
    x[4, 7] = float("nan")
    leaves = [t.requires_grad_() for t in (x, W, b)]
    values, indices = ops.topk_encode(*leaves, 5, backend="triton")
    grad_w = torch.autograd.grad(values.nan_to_num(0).sum(), leaves[1])[0]
    nan_latents = set(grad_w.isnan().any(0).nonzero().squeeze(1).tolist())
    assert nan_latents == set(indices[4].tolist())
    ref_values, ref_indices = TopKEncodeReference.apply(*leaves, 5)
    ref_grad_w = torch.autograd.grad(ref_values.nan_to_num(0).sum(), leaves[1])[0]
    assert set(ref_grad_w.isnan().any(0).nonzero().squeeze(1).tolist()) == set(ref_indices[4].tolist())
    # the other latents' gradients are the reference's
    others = [l for l in range(300) if l not in nan_latents | set(ref_indices[4].tolist())]
    torch.testing.assert_close(grad_w[:, others], ref_grad_w[:, others], atol=1e-5, rtol=0)


def test_inf_in_w_enc_gives_nan_in_grad_x_as_the_reference():
    """An inf weight W_enc[3, 17] with x[:, 3] = 0: latent 17's pre-activation is 0 * inf = NaN,
    ranked first and selected with value NaN, so its gradient is 0 (NaN > 0 is False); the
    reference's grad_x is then 0 * inf = NaN in column 3, where the gather used to skip the zero
    gradient and return a finite number."""
    x, W, b = make_inputs(6, 16, 40, torch.float32)
    W[3, 17] = float("inf")
    x[:, 3] = 0.0
    leaves = [t.requires_grad_() for t in (x, W, b)]
    values, indices = ops.topk_encode(*leaves, 5, backend="triton")
    assert bool((indices[:, 0] == 17).all())
    grad_x = torch.autograd.grad(values.nan_to_num(0).sum(), leaves[0])[0]
    ref_values, _ = TopKEncodeReference.apply(*leaves, 5)
    ref_grad_x = torch.autograd.grad(ref_values.nan_to_num(0).sum(), leaves[0])[0]
    assert bool(ref_grad_x[:, 3].isnan().all()) and int(ref_grad_x.isnan().sum()) == 6
    assert torch.equal(grad_x.isnan(), ref_grad_x.isnan())
    finite = ~ref_grad_x.isnan()
    torch.testing.assert_close(grad_x[finite], ref_grad_x[finite], atol=1e-5, rtol=0)


def latent_major(W):
    """W [d_in, n_latents] stored as E2ESAE stores it: an [n_latents, d_in] buffer, transposed."""
    return W.t().contiguous().t()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["latent_major", "strided_slice", "contiguous"])
def test_w_enc_layouts(layout, dtype):
    """E2ESAE's latent-major W_enc, a non-dense slice and the plain layout: same selection and
    gradients as the reference on a contiguous copy; grad_W_enc comes back in W_enc's layout
    when W_enc is dense (so autograd accumulates it without a copy)."""
    n_tokens, d_in, n_latents, k = 13, 40, 150, 7
    x, W, b = make_inputs(n_tokens, d_in, n_latents, dtype, bias_shift=-0.3)
    if layout == "latent_major":
        W = latent_major(W)
    elif layout == "strided_slice":
        W = torch.cat([W, torch.randn_like(W)], dim=1)[:, ::2]  # stride (2 * n, 2): not dense
    leaves = [t.detach().requires_grad_() for t in (x, W, b)]
    values, indices = ops.topk_encode(*leaves, k, backend="triton")
    assert_valid_topk(x, W, b, k, values, indices)
    ref_leaves = [t.detach().contiguous().requires_grad_() for t in (x, W, b)]
    ref_values, ref_indices = TopKEncodeReference.apply(*ref_leaves, k)
    if dtype == torch.float32:
        assert torch.equal(indices.sort(1).values, ref_indices.sort(1).values)
    grad_values = torch.randn_like(values)
    got = torch.autograd.grad((values * grad_values).sum(), leaves)
    assert_grads_close(got, dense_grad_reference(x, W, b, indices, grad_values), dtype)
    if layout != "strided_slice":
        assert got[1].stride() == W.stride()


def test_e2esae_stores_w_enc_latent_major():
    """The public W_enc is [d_in, n_latents]; its storage is [n_latents, d_in] (contiguous rows
    per latent), through Adam, state_dict, save / load and dtype moves; on disk the contiguous
    SAELens layout."""
    from safetensors.torch import load_file

    from fastsae import E2ESAE

    sae = E2ESAE(24, 90, activation="topk", k=5)
    assert sae.W_enc.shape == (24, 90) and sae.W_enc.stride() == (1, 24) and sae.W_enc.is_leaf
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(10, 24)
    (sae(x) - x).square().mean().backward()
    assert sae.W_enc.grad.stride() == (1, 24)
    optimizer.step()
    assert sae.W_enc.stride() == (1, 24)
    other = E2ESAE(24, 90, activation="topk", k=5)
    other.load_state_dict(sae.state_dict())
    assert torch.equal(other.W_enc, sae.W_enc) and other.W_enc.stride() == (1, 24)
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        sae.save_pretrained(directory)
        on_disk = load_file(f"{directory}/sae_weights.safetensors")["W_enc"]
        assert on_disk.shape == (24, 90) and on_disk.is_contiguous() and torch.equal(on_disk, sae.W_enc.detach())
        loaded = E2ESAE.from_pretrained(directory, dtype=torch.float16)
        assert loaded.W_enc.stride() == (1, 24) and torch.equal(loaded.W_enc, sae.W_enc.detach().half())
    assert sae.to(torch.float16).W_enc.stride() == (1, 24)


# ------------------------------------------------------------------ empty batch, int64 offsets

def grads_of(values, inputs):
    """Gradients of (values * fixed weights).sum() for the inputs that require one."""
    weights = torch.arange(values.numel(), dtype=torch.float32, device=values.device).reshape(values.shape)
    return torch.autograd.grad((values * weights.to(values.dtype)).sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("leading", [(0,), (2, 0)], ids=["N0", "2x0"])
def test_empty_batch_matches_reference(leading):
    """N = 0: empty values / indices, an empty grad_x and zero grad_W_enc / grad_b_enc, as the
    reference gives (the forward divided by the number of row blocks)."""
    _, W, b = make_inputs(1, 16, 90, torch.float32)
    results = {}
    for backend in ("triton", "torch"):
        x = torch.randn(*leading, 16, device=KERNEL_DEVICE)
        leaves = [t.clone().requires_grad_() for t in (x, W, b)]
        values, indices = ops.topk_encode(*leaves, 5, backend=backend)
        results[backend] = (values, indices, grads_of(values, leaves))
    (values, indices, grads), (ref_values, ref_indices, ref_grads) = results["triton"], results["torch"]
    assert values.shape == indices.shape == ref_values.shape == (*leading, 5)
    assert values.dtype == ref_values.dtype and indices.dtype == ref_indices.dtype == torch.int64
    for g, ref in zip(grads, ref_grads):
        assert g.shape == ref.shape and g.dtype == ref.dtype
        torch.testing.assert_close(g, ref, atol=0, rtol=0)
    # The backward kernels alone, on an empty code.
    x, W, _ = make_inputs(0, 16, 90, torch.float32)
    grad_x, grad_w, grad_b = tk.sparse_encoder_backward(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.int64,
                                                        device=KERNEL_DEVICE), x, W, True, True, True)
    assert grad_x.shape == (0, 16) and bool((grad_w == 0).all()) and bool((grad_b == 0).all())


@pytest.mark.parametrize("k, arch, per_sm", [(32, 90, 2), (64, 90, 2), (128, 90, 1), (32, 80, 1)])
def test_a_wave_counts_the_programs_each_sm_holds(k, arch, per_sm):
    """At K_PAD <= 64 on sm_90 two forward programs share an SM (one's selection overlaps the
    other's MMAs): the launcher fills SMs x 2 slots, recorded as it launches on an H100 (132 SMs)."""
    from compile_cases import recorded_launches

    n_tokens, n_latents = 4096, 46080
    with recorded_launches(arch, 132) as launches:
        tk.topk_encode_forward(*(torch.empty(*shape, dtype=torch.bfloat16, device="meta")
                                 for shape in ((n_tokens, 768), (768, n_latents), (n_latents,))), k)
    (record,) = launches
    assert tk.fwd_config(k, torch.bfloat16, torch.device("meta"), arch=arch)["programs_per_sm"] == per_sm
    row_blocks = -(-n_tokens // record.meta["BLOCK_M"])
    programs = row_blocks * -(-n_latents // record.args["latents_per_split"])
    assert 132 * (per_sm - 1) < programs <= 132 * per_sm


def test_default_splits_fill_one_wave():
    """splits = floor(slots / row blocks): one wave of programs, never more tiles than the latents hold."""
    assert tk.default_splits(0, 24576, 128, 128, 132) == 132  # an empty batch: no division by 0
    assert tk.default_splits(4096, 24576, 128, 128, 132) == 4  # 32 row blocks: 128 programs <= 132
    assert tk.default_splits(64, 24576, 64, 128, 132) == 132
    assert tk.default_splits(64, 300, 64, 128, 132) == 3  # no split shorter than a tile
    assert tk.default_splits(16384, 24576, 128, 128, 132) == 1  # the row blocks fill the SMs alone
    assert tk.default_splits(100, 24576, 16, 128, 1) == 1  # the interpreter: one program at a time
    for n_tokens in (1, 700, 4096, 9000):
        splits = tk.default_splits(n_tokens, 46080, 64, 64, 132)
        assert -(-n_tokens // 64) * splits <= max(132, -(-n_tokens // 64))


# Rows (or columns) this many elements apart: row 2 starts at 2 * FAR = 2^32 - 8192, which an int32
# offset wraps to -8192, i.e. onto other data of the same storage. The storage spans 8 GiB of
# fp16 but torch.empty only reserves it: the pages touched (a few rows) are all that gets memory.
FAR = 2**31 - 4096


def far_apart(n_rows, width, dtype, device=KERNEL_DEVICE):
    """An [n_rows, width] view whose rows are FAR elements apart, filled with randn."""
    base = 8192  # where row 2 lands with int32 offsets: inside the storage, zeros
    storage = torch.empty(base + (n_rows - 1) * FAR + width, dtype=dtype, device=device)
    storage[:base + width].zero_()
    view = storage.as_strided((n_rows, width), (FAR, 1), base)
    view.copy_(torch.randn(n_rows, width, device=device).to(dtype))
    return view


@pytest.mark.parametrize("layout", ["x_rows", "x_columns", "w_columns"])
def test_offsets_beyond_int32(layout):
    """x or W_enc strided so that an index times a stride passes 2^31 (as N * d does at 524,288
    tokens of d = 4,096): forward (shared GEMM tile) and backward (gather, segmented reduction)
    must use int64 offsets. Checked against the reference on contiguous copies."""
    dtype = torch.float16
    d_in, n_latents, n_tokens, k = 16, 40, 3, 3
    x, W, b = make_inputs(n_tokens, d_in, n_latents, dtype)
    if layout == "x_rows":
        x = far_apart(n_tokens, d_in, dtype)  # x[t] at t * FAR: token * stride_xm
    elif layout == "x_columns":
        d_in = 3
        x = far_apart(d_in, n_tokens, dtype).t()  # column-major x: d * stride_xd
        W, b = make_inputs(1, d_in, n_latents, dtype)[1:]
    else:
        n_latents = 3
        W = far_apart(n_latents, d_in, dtype).t()  # column-major W_enc: latent * stride_wn
        b = make_inputs(1, d_in, n_latents, dtype)[2]
    got = tk.topk_encode_triton(*(t.requires_grad_() for t in (x, W, b)), k)
    x_c, W_c, b_c = (t.detach().contiguous().requires_grad_() for t in (x, W, b))
    ref = TopKEncodeReference.apply(x_c, W_c, b_c, k)
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], atol=TOL[dtype], rtol=TOL[dtype])
    for g, r in zip(grads_of(got[0], (x, W, b)), grads_of(ref[0], (x_c, W_c, b_c))):
        torch.testing.assert_close(g.float(), r.float(), atol=4 * TOL[dtype] * (r.abs().max().item() + 1), rtol=0)
    if layout != "w_columns":  # the segmented reduction's x loads alone (the forward is right)
        grad = torch.randn(n_tokens, k, device=KERNEL_DEVICE).to(dtype)
        _, grad_w, _ = tk.sparse_encoder_backward(grad, ref[1], x.detach(), W.detach(), False, True, False)
        ref_w = scatter_rows_weighted(grad.float(), ref[1], x_c.detach().float(), n_latents).t()
        torch.testing.assert_close(grad_w.float(), ref_w, atol=4 * TOL[dtype] * (ref_w.abs().max().item() + 1), rtol=0)


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(512, 768, 24576, 32), (300, 768, 49152, 100), (64, 512, 131072, 13),
                                   (2048, 768, 24576, 1)], ids=lambda s: "N{}-d{}-n{}-k{}".format(*s))
def test_gpu_matches_reference(shape, dtype):
    n_tokens, d_in, n_latents, k = shape
    x, W, b = make_inputs(n_tokens, d_in, n_latents, dtype, device="cuda")
    for t in (x, W, b):
        t.requires_grad_()
    values, indices = ops.topk_encode(x, W, b, k)  # auto: Triton on CUDA
    assert_valid_topk(x, W, b, k, values, indices)
    grad_values = torch.randn_like(values)
    got = torch.autograd.grad((values * grad_values).sum(), (x, W, b))
    assert_grads_close(got, dense_grad_reference(x, W, b, indices, grad_values), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [16, 64, 128, 256])
def test_gpu_latent_major_w_enc_every_config(k, dtype):
    """E2ESAE's latent-major W_enc through every forward config (K_PAD 16..256) on the GPU, with
    a NaN latent ranked first as torch.topk ranks it."""
    x, W, b = make_inputs(1000, 768, 24576, dtype, device="cuda")
    W = latent_major(W)
    W[:, 77] = float("nan")
    values, indices = tk.topk_encode_triton(x, W, b, k)
    assert bool((indices[:, 0] == 77).all()) and bool(values[:, 0].isnan().all())
    W[:, 77] = 0.0
    leaves = [t.detach().requires_grad_() for t in (x, W, b)]
    values, indices = tk.topk_encode_triton(*leaves, k)
    assert_valid_topk(x, W, b, k, values, indices)
    grad_values = torch.randn_like(values)
    got = torch.autograd.grad((values * grad_values).sum(), leaves)
    assert got[1].stride() == W.stride()
    assert_grads_close(got, dense_grad_reference(x, W, b, indices, grad_values), dtype)
