"""E2ESAE: shapes, math, dtypes, decoder normalisation, save/load, and every error it promises."""

import json
import re

import pytest
import torch

import fastsae
from fastsae import E2ESAE, SparseCode
from fastsae.spec import activations_with


def test_readme_example_shape_topk_forward_backward_on_cpu():
    sae = E2ESAE(768, 24576, activation="topk", k=32)
    x = torch.randn(4, 128, 768)
    out, code = sae(x, return_code=True)
    assert out.shape == x.shape and code.values.shape == code.indices.shape == (4, 128, 32)
    (out - x).square().mean().backward()
    assert sae.W_enc.grad.shape == (768, 24576) and sae.W_dec.grad.shape == (24576, 768)
    assert torch.isfinite(sae.W_enc.grad).all() and sae.W_enc.grad.abs().sum() > 0


def test_init_unit_decoder_rows_and_encoder_transpose_option():
    sae = E2ESAE(16, 40, init="orthogonal")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    # orthogonal directions: with n_latents <= d_in the decoder rows are orthonormal
    narrow = E2ESAE(16, 10, init="orthogonal")
    torch.testing.assert_close(narrow.W_dec @ narrow.W_dec.t(), torch.eye(10), atol=1e-5, rtol=0)
    tied = E2ESAE(16, 40, init="orthogonal", init_encoder_as_decoder_transpose=True)
    torch.testing.assert_close(tied.W_enc, tied.W_dec.t())
    assert torch.all(sae.b_enc == 0) and torch.all(sae.b_dec == 0)


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 3)])
def test_forward_matches_the_formula_with_forward_normalised_decoder(activation, k):
    sae = E2ESAE(6, 20, activation, k)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(20, 1) + 0.5)  # rows no longer unit norm
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(2, 5, 6)
    pre = torch.relu(x @ sae.W_enc + sae.b_enc)
    if activation == "topk":
        values, indices = pre.topk(k, dim=-1)
        pre = torch.zeros_like(pre).scatter(-1, indices, values)
    W_unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae(x), pre @ W_unit + sae.b_dec)
    code = sae.encode(x)
    dense = code.to_dense(20) if activation == "topk" else code
    torch.testing.assert_close(dense, pre)


def test_project_mode_uses_stored_decoder_and_keeps_it_unit_norm():
    sae = E2ESAE(6, 20, "topk", 4, decoder_norm="project")
    assert sae.decoder_row_scale() is None
    x = torch.randn(8, 6)
    sae(x).square().sum().backward()
    sae.remove_decoder_parallel_grad_()
    along = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert along.abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.sub_(0.1 * sae.W_dec.grad)
    sae.project_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))


def test_gradients_reach_every_parameter_through_the_forward_norm():
    for activation, k in (("relu", None), ("topk", 5)):
        sae = E2ESAE(8, 30, activation, k)
        out, code = sae(torch.randn(10, 8), return_code=True)
        sparsity = (code.values if activation == "topk" else code).abs().sum()
        (out.square().sum() + sparsity).backward()
        for name, p in sae.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
def test_dtypes_and_leading_dims(dtype, activation, k):
    sae = E2ESAE(12, 48, activation, k, dtype=dtype)
    x = torch.randn(2, 3, 4, 12, dtype=dtype)
    out = sae(x)
    assert out.shape == x.shape and out.dtype == dtype
    ref = E2ESAE(12, 48, activation, k).to(torch.float32)
    ref.load_state_dict({n: p.float() for n, p in sae.state_dict().items()})
    torch.testing.assert_close(out.float(), ref(x.float()), atol=0.1, rtol=0.05)


def test_save_and_load_round_trip(tmp_path):
    sae = E2ESAE(10, 33, "topk", 7, decoder_norm="project", metadata={"hook_name": "blocks.1.hook_resid_pre"})
    with torch.no_grad():
        sae.b_enc.normal_()
    sae.save_pretrained(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = E2ESAE.from_pretrained(tmp_path / "sae")
    assert (loaded.k, loaded.decoder_norm, loaded.metadata) == (7, "project", sae.metadata)
    for name, p in sae.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    x = torch.randn(5, 10)
    torch.testing.assert_close(loaded(x), sae(x))
    as_bf16 = E2ESAE.from_pretrained(tmp_path / "sae", dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16


def test_save_is_atomic_a_crash_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    sae = E2ESAE(4, 9)
    sae.save_pretrained(tmp_path)
    import safetensors.torch

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        sae.W_enc.add_(1)
    with pytest.raises(RuntimeError, match="disk full"):
        sae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    torch.testing.assert_close(E2ESAE.from_pretrained(tmp_path).W_enc, sae.W_enc.detach() - 1)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"activation": "gelu"}, ValueError, "activation must be one of"),
    ({"activation": "topk"}, ValueError, "k is required for activation 'topk'"),
    ({"activation": "topk", "k": 0}, ValueError, r"k must be in \[1, n_latents=20\]"),
    ({"activation": "topk", "k": 21}, ValueError, r"k must be in \[1, n_latents=20\]"),
    ({"activation": "topk", "k": 2.5}, ValueError, "k must be an int"),
    ({"activation": "relu", "k": 4}, ValueError, re.escape(f"k is only for the activations {list(activations_with('k'))}")),
    ({"activation": "jumprelu", "bandwidth": 0}, ValueError, r"bandwidth must be in \(0, inf\)"),
    ({"activation": "jumprelu", "band": 1}, ValueError, "activation 'jumprelu' has no hyperparameter 'band'"),
    ({"activation": "batchtopk"}, ValueError, "k is required for activation 'batchtopk'"),
    ({"decoder_norm": "never"}, ValueError, "decoder_norm must be one of"),
    ({"n_latents": 0}, ValueError, "n_latents must be a positive int"),
])
def test_constructor_errors(kwargs, error, match):
    args = {"d_in": 8, "n_latents": 20, **kwargs}
    with pytest.raises(error, match=match):
        E2ESAE(**args)


def test_input_errors():
    sae = E2ESAE(8, 20, "topk", 2)
    with pytest.raises(ValueError, match="last dimension d_in=8"):
        sae(torch.randn(3, 9))
    with pytest.raises(TypeError, match="x has dtype torch.float16"):
        sae(torch.randn(3, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="is on meta"):
        sae(torch.randn(3, 8, device="meta"))
    with pytest.raises(TypeError, match="expects the SparseCode"):
        sae.decode(torch.randn(3, 20))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE directory"):
        E2ESAE.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no cfg.json"):
        E2ESAE.from_pretrained(tmp_path)
    E2ESAE(4, 9).save_pretrained(tmp_path)
    weights = (tmp_path / "sae_weights.safetensors").read_bytes()
    (tmp_path / "sae_weights.safetensors").write_bytes(weights[:40])
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        E2ESAE.from_pretrained(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(weights)
    config = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        E2ESAE.from_pretrained(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**config, "l1_coeff": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['l1_coeff'\]"):
        E2ESAE.from_pretrained(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**config, "n_latents": 10}))
    with pytest.raises(ValueError, match="W_enc has shape"):
        E2ESAE.from_pretrained(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no sae_weights.safetensors"):
        E2ESAE.from_pretrained(tmp_path)


def test_package_exports():
    assert fastsae.E2ESAE is E2ESAE and fastsae.SparseCode is SparseCode
    assert callable(fastsae.ops.topk_encode) and callable(fastsae.ops.fused_linear_kl)


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 5)])
@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
def test_trains_through_the_triton_kernels_like_the_reference(monkeypatch, activation, k, decoder_norm):
    """E2ESAE -> fastsae.ops -> fastsae.kernels: the path a CUDA run takes (here under Triton's
    interpreter) gives the reference's outputs and gradients."""
    pytest.importorskip("triton")
    from conftest import KERNEL_DEVICE

    sae = E2ESAE(24, 100, activation, k, decoder_norm=decoder_norm, device=KERNEL_DEVICE)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.3)
    x = torch.randn(2, 3, 24, device=KERNEL_DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTSAE_BACKEND", backend)
        sae.zero_grad()
        out, code = sae(x, return_code=True)
        values = code.values if activation == "topk" else code
        ((out - x).square().mean() + values.abs().sum() / 24).backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in sae.parameters()])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-4, rtol=1e-4)
    for got, want in zip(results["triton"][1], results["torch"][1]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation, k", [("relu", None), ("topk", 5)])
def test_encode_sparse_holds_exactly_the_active_latents(monkeypatch, activation, k):
    monkeypatch.setattr("fastsae.ops.checks.CHUNK_ELEMENTS", 64 * 3)  # 3 tokens per chunk: several chunks
    torch.manual_seed(0)
    sae = E2ESAE(16, 64, activation, k)
    with torch.no_grad():
        sae.b_enc[0] = 5.0  # latent 0 fires on every token: padding (index 0) must not hide it
    x = torch.randn(2, 7, 16)
    code = sae.encode_sparse(x)
    dense = sae.encode(x)
    dense = dense.to_dense(64) if activation == "topk" else dense
    assert code.values.shape[:-1] == (2, 7) and code.indices.dtype == torch.int64
    width = k or int((dense > 0).sum(-1).max())
    assert code.values.shape[-1] == width
    torch.testing.assert_close(code.to_dense(64), dense)  # chunked GEMMs round differently
    assert torch.equal((code.values > 0).sum(-1), (dense > 0).sum(-1))
