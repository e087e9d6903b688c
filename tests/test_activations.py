"""The activation registry's conformance suite: every activation in fastsae.activations, by name.

For each one, with the hyperparameters its module gives as example_params:
- E2ESAE's training pass (the kind's fused path) equals the activation's naive dense form
  (dense_forward, dense_loss_terms): reconstruction, every named loss term, L0, per-latent fire
  counts, and the gradients of every parameter and of the input, in float64, in training and eval
  mode, for both decoder norms;
- encode / decode / encode_sparse give the naive code and reconstruction;
- save and load in every format that expresses it give the same spec and function, and a format
  that cannot is refused with the activation's reason;
- a Trainer trains it on a tiny model (every trainable tensor moves, the loss goes down on a fixed
  batch), and a run resumed from a checkpoint equals an uninterrupted one exactly.
Each as an SAE and as a transcoder (d_out != d_in, reading one activation and matching another),
with and without its affine skip path (CODERS).
Sharded == unsharded runs over the same registry in tests/test_distributed.py. The library
round trips against SAELens's own loader are in tests/test_formats.py (CI's second leg). A kind with
no fused path trains through the chunked dense reference: tests/test_dense_reference.py.
"""

import pytest
import torch

from fastsae import E2ESAE, formats
from fastsae.activations import ACTIVATIONS, SparseCode, TrainingSettings
from fastsae.activations.base import power_sum
from fastsae.spec import SAESpec
from fastsae.train import Trainer, load_config
from fastsae.train import checkpoint as ckpt
from fastsae.train.metrics import read_metrics
from helpers_models import random_batches

NAMES = sorted(ACTIVATIONS)
D, N = 8, 24
D_OUT = 5  # a transcoder's output width
# coder -> (d_out, skip): an SAE, a transcoder, a skip-transcoder
CODERS = {"sae": (D, False), "transcoder": (D_OUT, False), "skip_transcoder": (D_OUT, True)}


def make(name, decoder_norm="forward", dtype=torch.float64, seed=0, coder="sae"):
    torch.manual_seed(seed)
    d_out, skip = CODERS[coder]
    sae = E2ESAE(D, N, name, decoder_norm=decoder_norm, dtype=dtype, d_out=d_out, skip=skip,
                 **ACTIVATIONS[name].example_params)
    with torch.no_grad():  # a code neither empty nor full, thresholds not all equal
        sae.b_enc.add_(0.2 * torch.randn(N, dtype=dtype))
        if skip:  # a skip path that is not zero, so its gradients and its part of the output show
            sae.W_skip.normal_(0, 0.3)
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.add_(0.3 * torch.randn(N, dtype=dtype))
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.15)
    return sae


def naive(sae, x, p=1.0, target=None):
    """The activation's dense form: (reconstruction, sparsity term, mean L0, fire counts, dense code,
    {name: loss term}); a transcoder's reconstruction has its skip path x @ W_skip, and the kind's
    own terms compare with target less that path."""
    x2 = x.reshape(-1, D)
    pre = x2 @ sae.W_enc + sae.b_enc
    code, l0 = sae.activation_fn.dense_forward(pre, sae, sae.training)
    scale = sae.decoder_row_scale()
    W_dec = sae.W_dec if scale is None else sae.W_dec * scale[:, None]
    skip = 0 if sae.W_skip is None else x2 @ sae.W_skip
    reconstruction = code @ W_dec + sae.b_dec + skip
    lp_sum = power_sum(code, p)
    sparsity = sae.activation_fn.sparsity_term(lp_sum, l0, p, D)
    settings = TrainingSettings(p=p) if target is None else TrainingSettings(
        p=p, target=lambda: target.reshape(-1, sae.d_out) - skip)
    terms = sae.activation_fn.dense_loss_terms(sae, x2, code, l0, settings)
    return (reconstruction.reshape(*x.shape[:-1], sae.d_out), sparsity, l0.mean(), (code > 0).sum(0, dtype=torch.int32),
            code, terms)


def _parameters_and_input(sae, x):
    return {**{name: p for name, p in sae.named_parameters()}, "x": x}


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_training_pass_equals_the_naive_form_with_gradients(name, training, decoder_norm, coder):
    ps = (1.0, 0.5) if ACTIVATIONS[name].sparsity_uses_p else (1.0,)
    for p in ps:
        sae = make(name, decoder_norm, coder=coder).train(training)
        x = torch.randn(3, 7, D, dtype=torch.float64, requires_grad=True)
        target = None if coder == "sae" else torch.randn(3, 7, D_OUT, dtype=torch.float64)
        out = sae.training_forward(x, p, target=target)
        want = naive(sae, x, p, target)
        torch.testing.assert_close(out.reconstruction, want[0])
        torch.testing.assert_close(out.sparsity, want[1])
        torch.testing.assert_close(out.l0, want[2].detach())
        assert torch.equal(out.fire_counts, want[3])
        assert 0 < want[2] < N  # a code neither empty nor full: the test sees both kinds of latent
        if out.code is not None:
            torch.testing.assert_close(out.code.to_dense(N).reshape(-1, N), want[4])
        assert set(out.terms) == set(want[5]), name  # no AuxK here: no dead latents given
        for term, value in want[5].items():
            torch.testing.assert_close(out.terms[term].value, value, msg=lambda m: f"{name} term {term}: {m}")

        loss = (out.reconstruction - 1).square().mean() + 0.3 * sum(t.value for t in out.terms.values())
        reference = (want[0] - 1).square().mean() + 0.3 * sum(want[5].values())
        mine = torch.autograd.grad(loss, list(_parameters_and_input(sae, x).values()), allow_unused=True)
        theirs = torch.autograd.grad(reference, list(_parameters_and_input(sae, x).values()), allow_unused=True)
        for key, a, b in zip(_parameters_and_input(sae, x), mine, theirs):
            if b is None:
                assert a is None or not a.any(), key
                continue
            torch.testing.assert_close(a, b, msg=lambda m: f"{name} grad {key} (p={p}): {m}")
        if hasattr(sae, "log_threshold") and training:
            assert theirs[list(_parameters_and_input(sae, x)).index("log_threshold")].abs().sum() > 0


@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_and_encode_sparse_give_the_naive_code(name, training, coder):
    sae = make(name, coder=coder).train(training)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    target = None if coder == "sae" else torch.zeros(2, 5, D_OUT, dtype=torch.float64)  # for the kinds' terms
    reconstruction, _, _, _, code, _ = naive(sae, x, target=target)
    encoded = sae.encode(x)
    dense = encoded.to_dense(N) if isinstance(encoded, SparseCode) else encoded
    torch.testing.assert_close(dense.reshape(-1, N), code.detach())
    torch.testing.assert_close(sae.add_skip(x, sae.decode(encoded)), reconstruction.detach())
    torch.testing.assert_close(sae(x), reconstruction.detach())
    if not name.endswith("batchtopk") or not training:  # a batch selection depends on the whole batch
        torch.testing.assert_close(sae.encode_sparse(x).to_dense(N).reshape(-1, N), code.detach())


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
@pytest.mark.parametrize("name", NAMES)
def test_every_format_round_trips_the_activation_or_refuses_it(tmp_path, name, decoder_norm):
    sae = make(name, decoder_norm, dtype=torch.float32).eval()
    sae.metadata.update(hook="blocks.1.hook_resid_pre", model="gpt2")
    x = torch.randn(4, 6, D)
    for fmt in formats.FORMATS:
        refusal = ACTIVATIONS[name].sparsify_refusal if fmt == "sparsify" else None
        if refusal:
            with pytest.raises(ValueError, match="sparsify stores"):
                sae.save_pretrained(tmp_path / fmt, format=fmt)
            continue
        loaded = E2ESAE.from_pretrained(sae.save_pretrained(tmp_path / fmt, format=fmt)).eval()
        assert (loaded.spec.activation, loaded.spec.params) == (sae.spec.activation, sae.spec.params), fmt
        if fmt == "fastsae":
            assert loaded.spec == sae.spec and loaded.metadata == sae.metadata
            for tensor in sae.tensor_names():
                assert torch.equal(getattr(loaded, tensor), getattr(sae, tensor)), tensor
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-6, msg=lambda m: f"{fmt}: {m}")
        if fmt == "saelens":  # fastsae's spec travels in the metadata: the same SAE comes back
            assert loaded.spec == SAESpec.create(D, N, name, params=sae.spec.hyperparameters(),
                                                 decoder_norm=decoder_norm, init=sae.init)


# ------------------------------------------------------------------ the trainer

CTX, BATCH = 16, 4
HOOK = "blocks.1.hook_resid_pre"
# a transcoder of block 1's MLP: reads its input (after ln2), replaces its output
TRANSCODER_HOOK = "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out"
TRAINER_HOOKS = {"sae": HOOK, "transcoder": TRANSCODER_HOOK, "skip_transcoder": TRANSCODER_HOOK}


def _config(tmp_path, model_dir, name, run, coder="sae"):
    params = dict(ACTIVATIONS[name].example_params)
    k = params.pop("k", None)
    return load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{TRAINER_HOOKS[coder]}]", f"saes.skip={coder == 'skip_transcoder'}",
        "saes.n_latents=64", f"saes.activation={name}",
        f"saes.k={'null' if k is None else k}", f"saes.params={params}", "loss.local_mse_coeff=1",
        f"optim.batch_size={BATCH}", f"data.context_length={CTX}", f"optim.n_tokens={6 * BATCH * CTX}",
        "optim.warmup_samples=8", "optim.lr=3e-3", "eval.n_tokens=128", "log.every=1", "log.progress=false",
        "log.dead_window_tokens=128", f"run_dir={tmp_path / run}"])


@pytest.mark.parametrize("coder", ["sae", "skip_transcoder"])
@pytest.mark.parametrize("name", NAMES)
def test_a_trainer_trains_it_and_resumes_it_exactly(tmp_path, model_dir, lm, name, coder):
    data = random_batches(6, BATCH, CTX, seed=0, vocab=250)
    eval_data = random_batches(2, BATCH, CTX, seed=99, vocab=250)
    hook = TRAINER_HOOKS[coder]
    full = Trainer(_config(tmp_path, model_dir, name, "full", coder), model=lm, dataset=data, eval_dataset=eval_data)
    before = {t: getattr(full.saes[hook], t).detach().clone() for t in full.saes[hook].tensor_names()}
    assert ("W_skip" in before) == (coder == "skip_transcoder")
    full.fit()
    for tensor, value in before.items():
        moved = not torch.equal(getattr(full.saes[hook], tensor), value)
        assert moved or tensor not in dict(full.saes[hook].named_parameters()), f"{name}: {tensor} did not train"
    part = Trainer(_config(tmp_path, model_dir, name, "part", coder), model=lm, dataset=data, eval_dataset=eval_data)
    part.fit(max_steps=3)
    resumed = Trainer.from_run_dir(part.run_dir, model=lm, dataset=data, eval_dataset=eval_data)
    resumed.fit()
    for tensor in before:
        assert torch.equal(getattr(resumed.saes[hook], tensor), getattr(full.saes[hook], tensor)), f"{name}: {tensor}"
    losses = lambda run: [r["loss"] for r in read_metrics(run.run_dir) if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(full)
    assert ckpt.latest_checkpoint(full.run_dir).name == "step_00000006"


@pytest.mark.parametrize("coder", ["sae", "transcoder"])
@pytest.mark.parametrize("name", NAMES)
def test_the_loss_goes_down_on_a_fixed_batch(tmp_path, model_dir, lm, name, coder):
    trainer = Trainer(_config(tmp_path, model_dir, name, "run", coder), model=lm)
    tokens = random_batches(1, BATCH, CTX, seed=0, vocab=250)[0]
    history = [trainer.step(tokens) for _ in range(8)]
    # the whole dictionary's reconstruction and sparsity (a kind's other terms, AuxK or Matryoshka's
    # inner prefixes, follow their own course)
    main = [m["loss/local_mse"] + m["loss/sparsity"] for m in history]
    assert main[-1] < 0.8 * main[0], main
    hook = TRAINER_HOOKS[coder]
    assert {"l0", f"l0/{hook}", f"alive/{hook}", "kl", "loss/sparsity"} <= set(history[-1])
    kind_terms = set(history[-1]) - {"loss/kl", "loss/local_mse", "loss/sparsity", "loss/auxk"}
    assert {t for t in kind_terms if t.startswith("loss/")} == {
        f"loss/prefix_mse_{w}" for w in ACTIVATIONS[name].example_params.get("widths", ())}



def batchtopk_tie_case(dtype):
    """(an E2ESAE with batchtopk k = 1 and an identity encoder, x): pre-activations on a coarse grid,
    five values of 2 or 3 per token out of 16 latents, so the batch threshold (the 4th largest of 64)
    is a 2 with many ties, most of them beyond a token's first candidates (2 = 2k)."""
    torch.manual_seed(0)
    n_tokens, d, n = 4, 16, 16
    sae = E2ESAE(d, n, "batchtopk", k=1, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d, n, dtype=dtype))
        sae.b_enc.zero_()
    x = torch.ones(n_tokens, d, dtype=dtype)
    x[:, [1, 2, 3, 7]] = 2
    x[0, 0] = 3
    x[1:, 0] = 2
    return sae.train(), x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_batchtopk_keeps_every_tie_at_the_threshold(dtype):
    """Every value equal to the batch threshold is kept, as dense_forward keeps them: the selection
    widens its candidates while a token's smallest candidate equals the threshold (not only while it
    exceeds it). Sharded SAEs: tests/test_distributed.py."""
    sae, x = batchtopk_tie_case(dtype)
    want, _ = sae.activation_fn.dense_forward(x @ sae.W_enc + sae.b_enc, sae, True)
    got = sae.training_forward(x).code.to_dense(sae.n_latents)
    assert int((want > 0).sum()) == 20  # every 2 and 3: the threshold's ties
    torch.testing.assert_close(got, want, rtol=0, atol=0)
