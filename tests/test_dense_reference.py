"""The chunked dense reference: the training path of a kind without a fused one.

A kind that overrides none of training_forward / encode / memory trains through
fastsae.activations.paths.dense_reference_pass: its dense_forward a chunk of tokens at a time, each
chunk recomputed in backward. Here a JumpReLU that takes that path (its trained threshold exercises
the straight-through estimators through the recomputation) stands in for the registry's JumpReLU
for the tests only, and:
- its training pass equals the naive dense form in values and float64 gradients, with chunks far
  smaller than the batch, and no dense_forward call (forward or recomputed) ever sees more than one
  chunk's tokens;
- a Trainer trains it, its encode / encode_sparse give the naive code, and `fastsae plan` counts its
  chunk;
- the per-token sums a kind asks for (per_token) come back summed over the batch's chunks.
"""

import pytest
import torch

from fastsae import E2ESAE
from fastsae.activations import ACTIVATIONS, Activation, TrainingSettings, paths
from fastsae.activations.jumprelu import JumpReLU
from fastsae.ops import checks

D, N = 8, 24


class ChunkedJumpReLU(JumpReLU):
    """JumpReLU on the base class's paths: the chunked dense reference and dense encode."""

    name = "jumprelu"
    training_forward = Activation.training_forward
    encode = Activation.encode
    encode_sparse = Activation.encode_sparse
    memory = Activation.memory
    seen_rows: list = []

    def dense_forward(self, pre, sae, training):
        ChunkedJumpReLU.seen_rows.append(pre.shape[0])
        return super().dense_forward(pre, sae, training)


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setitem(ACTIVATIONS, "jumprelu", ChunkedJumpReLU)
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 4 * N)  # 4 tokens per chunk
    ChunkedJumpReLU.seen_rows = []
    return ChunkedJumpReLU


def make(decoder_norm="forward"):
    torch.manual_seed(0)
    sae = E2ESAE(D, N, "jumprelu", decoder_norm=decoder_norm, dtype=torch.float64,
                 bandwidth=0.5, init_threshold=0.1)
    with torch.no_grad():
        sae.b_enc.add_(0.2 * torch.randn(N, dtype=torch.float64))
        sae.log_threshold.add_(0.3 * torch.randn(N, dtype=torch.float64))
    return sae


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
def test_chunked_pass_equals_the_dense_form_and_never_holds_more_than_a_chunk(chunked, decoder_norm):
    sae = make(decoder_norm)
    x = torch.randn(3, 7, D, dtype=torch.float64, requires_grad=True)
    out = sae.training_forward(x)
    assert paths.dense_chunk_rows(N) == 4
    assert max(chunked.seen_rows) <= 4 and len(chunked.seen_rows) == 6  # 21 tokens: 6 chunks in forward
    chunked.seen_rows.clear()

    pre = x.reshape(-1, D) @ sae.W_enc + sae.b_enc
    code, l0 = sae.activation_fn.dense_forward(pre, sae, True)
    chunked.seen_rows.clear()
    W_dec = sae.normalised_decoder()
    reconstruction = (code @ W_dec + sae.b_dec).reshape(x.shape)
    terms = sae.activation_fn.dense_loss_terms(sae, x.reshape(-1, D), code, l0, TrainingSettings())
    torch.testing.assert_close(out.reconstruction, reconstruction)
    torch.testing.assert_close(out.sparsity, terms["sparsity"])
    torch.testing.assert_close(out.l0, l0.mean().detach())
    assert torch.equal(out.fire_counts, (code > 0).sum(0, dtype=torch.int32))
    assert 0 < out.l0 < N

    inputs = [*sae.parameters(), x]
    mine = torch.autograd.grad((out.reconstruction - 1).square().mean() + 0.3 * out.sparsity, inputs)
    assert max(chunked.seen_rows) <= 4 and len(chunked.seen_rows) == 6  # backward recomputed each chunk
    theirs = torch.autograd.grad((reconstruction - 1).square().mean() + 0.3 * terms["sparsity"], inputs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)
    names = [name for name, _ in sae.named_parameters()]
    assert isinstance(sae.activation_fn, ChunkedJumpReLU) and mine[names.index("log_threshold")].abs().sum() > 0


def test_encode_and_encode_sparse_give_the_dense_code(chunked):
    sae = make().eval()
    x = torch.randn(10, D, dtype=torch.float64)
    code, _ = sae.activation_fn.dense_forward(x @ sae.W_enc + sae.b_enc, sae, False)
    torch.testing.assert_close(sae.encode(x), code)
    torch.testing.assert_close(sae.encode_sparse(x).to_dense(N), code)
    torch.testing.assert_close(sae(x), code @ sae.normalised_decoder() + sae.b_dec)


def test_per_token_sums_are_summed_over_chunks(chunked):
    sae = make()
    x = torch.randn(9, D, dtype=torch.float64)
    out = paths.dense_reference_pass(sae, x, sae.activation_fn, 1.0,
                                     per_token=lambda pre, code, xc: {"pre_sum": pre.sum(-1), "x_sq": xc.square().sum(-1)})
    torch.testing.assert_close(out.per_token["pre_sum"], (x @ sae.W_enc + sae.b_enc).sum(-1))
    torch.testing.assert_close(out.per_token["x_sq"], x.square().sum(-1))


def test_a_trainer_trains_it_and_plan_counts_its_chunk(chunked, monkeypatch, tmp_path, model_dir, lm):
    from fastsae.train import Trainer, load_config
    from fastsae.train.plan import memory_plan
    from helpers_models import random_batches

    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 16 * 64)  # 16 of the batch's 64 tokens per chunk
    config = load_config({}, [
        f"model.name={model_dir}", "saes.hooks=[blocks.1.hook_resid_pre]", "saes.n_latents=64",
        "saes.activation=jumprelu", "saes.params={bandwidth: 0.5, init_threshold: 0.1}",
        "optim.batch_size=4", "data.context_length=16", "optim.n_tokens=256", "optim.warmup_samples=4",
        "optim.lr=3e-3", "log.progress=false", f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, model=lm)
    tokens = random_batches(1, 4, 16, seed=0, vocab=250)[0]
    before = trainer.saes["blocks.1.hook_resid_pre"].log_threshold.detach().clone()
    history = [trainer.step(tokens) for _ in range(6)]
    assert isinstance(trainer.saes["blocks.1.hook_resid_pre"].activation_fn, ChunkedJumpReLU)
    assert max(ChunkedJumpReLU.seen_rows) <= 16
    assert history[-1]["loss"] < history[1]["loss"]
    assert not torch.equal(trainer.saes["blocks.1.hook_resid_pre"].log_threshold, before)
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 1 << 24)
    plan = memory_plan(load_config("gpt2-e2e", ["saes.activation=jumprelu"]))
    rows = paths.dense_chunk_rows(46_080)
    assert plan.items["kernel workspaces"] == 4 * rows * 46_080 * 4 + (1 << 24) * 4  # its chunk, the KL's blocks
