"""Loss terms against the paper's formulas, written densely here."""

import pytest
import torch
import torch.nn.functional as F

from fastsae.activations.base import lp_norm_term, power_sum
from fastsae.sae import E2ESAE, SparseCode
from fastsae.train import losses


def test_sparsity_is_lp_norm_mean_over_tokens_over_d_in():
    """The activations' Lp sparsity term (fastsae.activations.base) is the paper's
    calc_sparsity_loss / d_in, for a dense code and for the same code held sparsely."""
    code = torch.relu(torch.randn(2, 5, 40))
    code[0, 0] = 0  # an all-zero token: no NaN in the term or its gradient
    d_in = 8
    for p in (1.0, 0.5, 2.0):
        expected = torch.norm(code, p=p, dim=-1).mean() / d_in
        assert torch.allclose(lp_norm_term(power_sum(code, p), p, d_in), expected, rtol=1e-5)
        leaf = code.clone().requires_grad_(True)
        lp_norm_term(power_sum(leaf, p), p, d_in).backward()
        assert torch.isfinite(leaf.grad).all()
    values, indices = torch.rand(3, 7, 4), torch.stack([torch.randperm(30)[:4] for _ in range(21)]).view(3, 7, 4)
    sparse = SparseCode(values, indices)
    assert torch.allclose(power_sum(sparse.values, 0.5), power_sum(sparse.to_dense(30), 0.5))


def test_mse_is_mean_over_elements():
    a, b = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    assert torch.allclose(losses.mse_loss(a, b), ((a - b) ** 2).mean())
    assert losses.mse_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_kl_matches_the_papers_kl_div_and_ce_stats():
    torch.manual_seed(0)
    n, d, v = 12, 16, 50
    h_sae, h_orig = torch.randn(2, n // 2, d, requires_grad=True), torch.randn(2, n // 2, d)
    W_U, b_U = torch.randn(d, v), torch.randn(v)
    tokens = torch.randint(0, v, (2, n // 2))
    labels = losses.next_token_labels(tokens)
    kl, stats = losses.kl_loss(h_sae, h_orig, W_U, b_U, labels=labels)
    logits_sae, logits_orig = (h_sae @ W_U + b_U).flatten(0, 1), (h_orig @ W_U + b_U).flatten(0, 1)
    # e2e_sae: kl_div(log q_sae, log p_orig, log_target=True, reduction="batchmean") = KL(p_orig || q_sae)
    expected = F.kl_div(F.log_softmax(logits_sae, -1), F.log_softmax(logits_orig, -1), log_target=True,
                        reduction="batchmean")
    assert torch.allclose(kl, expected, rtol=1e-5)
    flat = labels.flatten()
    assert torch.allclose(stats.ce_orig, F.cross_entropy(logits_orig, flat, ignore_index=-100), rtol=1e-5)
    assert torch.allclose(stats.ce_sae, F.cross_entropy(logits_sae, flat, ignore_index=-100), rtol=1e-5)
    (grad,) = torch.autograd.grad(kl, h_sae)
    (grad_ref,) = torch.autograd.grad(expected, h_sae)
    assert torch.allclose(grad, grad_ref, rtol=1e-4, atol=1e-6)


def test_next_token_labels():
    tokens = torch.tensor([[5, 6, 7], [1, 2, 3]])
    assert losses.next_token_labels(tokens).tolist() == [[6, 7, -100], [2, 3, -100]]


def test_downstream_even_split_and_per_hook():
    clean = {"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}
    captured = {"a": torch.ones(2, 3), "b": 2 * torch.ones(2, 3)}
    total, per_hook = losses.downstream_loss(captured, clean, {"a": 1.25, "b": 1.25})
    assert total.item() == pytest.approx(1.25 * 1 + 1.25 * 4)
    assert per_hook["b"].item() == pytest.approx(4.0)


def test_explained_variance():
    x = torch.randn(100, 8)
    assert losses.explained_variance(x, x).item() == pytest.approx(1.0)
    assert losses.explained_variance(x, x.mean(0).expand_as(x)).item() == pytest.approx(0.0, abs=1e-6)


def _auxk_dense_reference(sae, x, recon, dead, k_aux):
    pre = x @ sae.W_enc + sae.b_enc
    pre = pre.masked_fill(~dead, float("-inf"))
    k = min(k_aux, int(dead.sum()))
    vals, idx = pre.topk(k, dim=-1)
    vals = torch.relu(vals)
    W_dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    e_hat = torch.einsum("nk,nkd->nd", vals, W_dec[idx])
    e = (x - recon).detach()
    return min(1.0, int(dead.sum()) / k_aux) * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_auxk_matches_a_dense_reference_and_touches_only_dead_latents(n_dead):
    torch.manual_seed(1)
    sae = E2ESAE(16, 64, "topk", k=4)
    x = torch.randn(30, 16)
    recon = sae(x).detach()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    loss = losses.auxk_loss(sae, x, recon, dead, k_aux=8)
    if n_dead == 0:
        assert loss.item() == 0.0
        return
    expected = _auxk_dense_reference(sae, x, recon, dead, 8)
    assert torch.allclose(loss, expected, rtol=1e-4)
    loss.backward()
    assert sae.W_enc.grad[:, ~dead].abs().max() == 0  # only the dead latents learn from AuxK
    assert sae.W_dec.grad[~dead].abs().max() == 0
    assert sae.W_enc.grad[:, dead].abs().max() > 0


def test_auxk_default_k_is_half_d_in():
    sae = E2ESAE(16, 64, "topk", k=4)
    x = torch.randn(10, 16)
    dead = torch.ones(64, dtype=torch.bool)
    expected = _auxk_dense_reference(sae, x, sae(x).detach(), dead, 8)
    assert torch.allclose(losses.auxk_loss(sae, x, sae(x).detach(), dead), expected, rtol=1e-4)
