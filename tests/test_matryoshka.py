"""Matryoshka BatchTopK beyond the conformance suite every kind runs (tests/test_activations.py,
tests/test_distributed.py, tests/test_formats.py):

- its loss terms are SAELens's (MatryoshkaBatchTopKTrainingSAE, run here when sae_lens is
  installed: CI's second leg): the same code, and each prefix's MSE over d_in;
- with prefix_loss="kl" the inner prefixes come back as reconstructions (the dense prefix sums,
  float64 gradients), and an e2e run adds the KL of each one's spliced run, as its own term;
- the prefix reconstructions never build an [N, n_latents] tensor;
- hyperparameters are checked with messages that name them.
"""

import pytest
import torch

import fastsae.ops.checks as checks
from fastsae import E2ESAE
from fastsae.activations import TrainingSettings
from fastsae.train import Trainer, load_config, losses
from helpers_models import random_batches
from tests.helpers_dispatch import AllocationRecorder

D, N, K, WIDTHS = 8, 24, 4, [6, 12]


def make(prefix_loss="mse", decoder_norm="forward", dtype=torch.float64, **params):
    torch.manual_seed(0)
    sae = E2ESAE(D, N, "matryoshka_batchtopk", k=K, widths=WIDTHS, prefix_loss=prefix_loss, decoder_norm=decoder_norm,
                 dtype=dtype, **params)
    with torch.no_grad():
        sae.b_enc.add_(0.2 * torch.randn(N, dtype=dtype))
    return sae


def dense_prefixes(sae, x):
    """{w: the reconstruction of prefix w}: the dense code's first w latents, decoded."""
    pre = x @ sae.W_enc + sae.b_enc
    code, _ = sae.activation_fn.dense_forward(pre, sae, True)
    decoder = sae.normalised_decoder()
    return {w: code[:, :w] @ decoder[:w] + sae.b_dec for w in WIDTHS}


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
def test_kl_prefixes_are_the_dense_prefix_sums_with_gradients(decoder_norm):
    sae = make("kl", decoder_norm).train()
    x = torch.randn(20, D, dtype=torch.float64, requires_grad=True)
    out = sae.training_forward(x)
    assert set(out.terms) == {"sparsity"}  # the prefixes' losses are the run's, on the reconstructions
    assert set(out.reconstructions) == {f"prefix_{w}" for w in WIDTHS}
    want = dense_prefixes(sae, x)
    weights = [0.3, 0.7]
    for (name, (value, weight)), w in zip(out.reconstructions.items(), WIDTHS):
        assert weight == 1.0
        torch.testing.assert_close(value, want[w])
    inputs = [*sae.parameters(), x]
    mine = torch.autograd.grad(sum(c * (value - 1).square().mean() for c, (value, _) in
                                   zip(weights, out.reconstructions.values())), inputs, allow_unused=True)
    theirs = torch.autograd.grad(sum(c * (want[w] - 1).square().mean() for c, w in zip(weights, WIDTHS)), inputs,
                                 allow_unused=True)
    for a, b in zip(mine, theirs):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b)


def test_prefix_coeff_weights_each_inner_term():
    x = torch.randn(20, D, dtype=torch.float64)
    one, half = make().train(), make(prefix_coeff=0.5).train()
    a, b = one.training_forward(x).terms, half.training_forward(x).terms
    for w in WIDTHS:
        torch.testing.assert_close(b[f"prefix_mse_{w}"].value, 0.5 * a[f"prefix_mse_{w}"].value)
        assert a[f"prefix_mse_{w}"].coefficient is None  # weighted by the kind, not by a run coefficient
    kl = make("kl", prefix_coeff=0.5).train().training_forward(x)
    assert [weight for _, weight in kl.reconstructions.values()] == [0.5, 0.5]


def test_eval_is_batchtopk_inference_without_prefix_terms():
    sae = make().eval()
    with torch.no_grad():
        sae.threshold.fill_(0.15)
    out = sae.training_forward(torch.randn(20, D, dtype=torch.float64))
    assert set(out.terms) == {"sparsity"} and not out.reconstructions and out.code is None


def test_the_prefixes_build_no_tokens_x_latents_tensor(monkeypatch):
    """Forward and backward of the training pass with every prefix's loss: no temporary as large
    as the [N, n_latents] code (the encoder walks the tokens in chunks; the prefixes mask the
    sparse code's entries)."""
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 2048)
    n_tokens, n_latents = 64, 4096
    torch.manual_seed(0)
    sae = E2ESAE(16, n_latents, "matryoshka_batchtopk", k=4, widths=[256, 1024]).train()
    x = torch.randn(n_tokens, 16)
    weights = {tuple(p.shape) for p in sae.parameters()} | {tuple(sae.W_enc.t().shape)}
    recorder = AllocationRecorder()
    with recorder:
        out = sae.training_forward(x)
        loss = (out.reconstruction - x).square().mean() + sum(t.value for t in out.terms.values())
        loss.backward()
    assert {f"prefix_mse_{w}" for w in (256, 1024)} <= set(out.terms)
    largest = max(torch.Size(s).numel() for s in recorder.shapes if s not in weights)
    assert largest < n_tokens * n_latents // 8, f"a temporary of {largest} elements"


@pytest.mark.parametrize("params,error", [
    ({"widths": []}, "widths must list the inner prefixes' widths"),
    ({"widths": [12, 6]}, "widths must increase strictly"),
    ({"widths": [6, 24]}, r"widths must each be below n_latents=24"),
    ({"widths": [6, 2.5]}, r"widths\[1\] must be an int"),
    ({"widths": [6], "prefix_loss": "ce"}, "prefix_loss must be one of"),
    ({"widths": [6], "prefix_coeff": -1}, r"prefix_coeff must be in \[0, inf\)"),
    ({}, "widths is required"),
])
def test_hyperparameters_are_checked_by_name(params, error):
    with pytest.raises((ValueError, TypeError), match=error):
        E2ESAE(D, N, "matryoshka_batchtopk", k=K, **params)


# ------------------------------------------------------------------ against SAELens


def test_loss_terms_are_saelens_inner_mse_losses_over_d_in():
    """SAELens's MatryoshkaBatchTopKTrainingSAE (6.x) on the same weights and batch: the same
    code, and each inner prefix's loss (a sum over d_in, a mean over tokens) is d_in times
    fastsae's prefix_mse_<w> (a mean over elements, as every fastsae MSE term); the whole
    dictionary's the same as fastsae's local MSE."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=N, k=K, matryoshka_widths=[*WIDTHS, N], apply_b_dec_to_input=False,
        rescale_acts_by_decoder_norm=False, dtype="float64"))  # (rescaled acts are a fold: tests/test_formats.py)
    ours = E2ESAE(D, N, "matryoshka_batchtopk", k=K, widths=WIDTHS, decoder_norm="project", dtype=torch.float64)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # SAELens decodes with W_dec as stored ("project")
            getattr(ours, name).copy_(getattr(theirs, name))
    x = torch.randn(32, D, dtype=torch.float64)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    reference = theirs.training_forward_pass(step)
    out = ours.train().training_forward(x, settings=TrainingSettings())
    torch.testing.assert_close(out.code.to_dense(N), reference.feature_acts)
    # fastsae's MSE terms are fp32 (fastsae.train.losses.mse_loss): compared at fp32's precision
    close = dict(rtol=1e-6, atol=1e-7, check_dtype=False)
    torch.testing.assert_close(D * losses.mse_loss(out.reconstruction, x), reference.losses["mse_loss"], **close)
    for w in WIDTHS:
        torch.testing.assert_close(D * out.terms[f"prefix_mse_{w}"].value, reference.losses[f"inner_mse_loss_{w}"],
                                   **close)
    assert not any(name.startswith("inner_mse_loss_") and int(name.rsplit("_", 1)[1]) not in WIDTHS
                   for name in reference.losses)


# ------------------------------------------------------------------ end to end, prefix_loss="kl"

CTX, BATCH, HOOK = 16, 4, "blocks.1.hook_resid_pre"


def test_an_e2e_run_adds_each_prefixs_kl_from_its_own_spliced_run(tmp_path, model_dir, lm):
    """loss/kl_prefix_<w> is prefix_coeff x kl_coeff x the KL of the model with prefix w's
    reconstruction spliced in (computed here independently, from the batch's clean residual)."""
    cfg = load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{HOOK}]", "saes.n_latents=64", "saes.activation=matryoshka_batchtopk",
        "saes.k=4", "saes.params={widths: [8, 32], prefix_loss: kl, prefix_coeff: 0.5}", "loss.kl_coeff=2.0",
        f"optim.batch_size={BATCH}", f"data.context_length={CTX}", "optim.n_tokens=256", "log.progress=false",
        f"run_dir={tmp_path / 'run'}", "device=cpu"])
    trainer = Trainer(cfg, model=lm)
    tokens = random_batches(1, BATCH, CTX, seed=0, vocab=250)[0]
    sae = trainer.saes[HOOK]
    with torch.no_grad():
        loss, metrics, _ = trainer.objective(tokens, train=True)
        h_orig, clean = lm.clean_run(tokens, [HOOK])
        code = sae.encode(clean[HOOK].reshape(-1, sae.d_in))
        decoder = sae.normalised_decoder()
        dense = code.to_dense(sae.n_latents)
        for w in (8, 32):
            prefix = (dense[:, :w] @ decoder[:w] + sae.b_dec).reshape(clean[HOOK].shape)
            h_prefix, _ = lm.spliced_run(tokens, {HOOK: lambda acts, p=prefix: p.to(acts.dtype)})
            kl, _ = losses.kl_loss(h_prefix.float(), h_orig.float(), trainer.objective.W_U, trainer.objective.b_U)
            torch.testing.assert_close(metrics[f"loss/kl_prefix_{w}"], 0.5 * 2.0 * kl, rtol=1e-4, atol=1e-6)
    assert "loss/prefix_mse_8" not in metrics and float(metrics["loss/kl"]) == pytest.approx(2.0 * float(metrics["kl"]))
    parts = sum(float(v) for name, v in metrics.items() if name.startswith("loss/"))
    assert float(loss) == pytest.approx(parts, rel=1e-5)
