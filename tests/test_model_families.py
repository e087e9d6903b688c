"""The ten model families of issue 9 load, splice exactly and train, on TransformerLens 4.x (the
TransformerBridge) and on 3.x (HookedTransformer where it loads a local directory, the bridge
fallback where it does not): GPT-2, Pythia (GPTNeoX), Llama, Mistral, Qwen2, Gemma-2, Gemma-3 (text),
Phi-3, OLMo, OLMo-2.

Each family is a tiny random-weight Hugging Face model (2 layers, d_model 64, 4 heads, GQA where
the family uses it) saved with a tiny tokenizer and loaded offline through
LanguageModel.load(directory). Checks per family:
    - splicing is exact: an identity replacement at blocks.1.hook_resid_pre gives the clean run's
      final hidden state, an edit there gives run_with_hooks' logits, and a run started from the
      cached residual (as the trainer runs it) gives the full run's;
    - the logit-free path cap(final_hidden @ W_U + b_U) reproduces the HF model's own logits
      (Gemma-2/3 with final-logit soft-capping);
    - two e2e training steps have a finite loss and change the SAE, and the eval KL / CE equal the
      KL / CE computed from the model's own logits with the SAE spliced in.
"""

import math

import pytest
import torch

from fastsae.model.backends import transformer_lens_version
from fastsae.model.lm import LanguageModel
from fastsae.train import Trainer, load_config
from fastsae.train.metrics import read_metrics
from helpers_models import MODEL_FAMILIES, random_batches, save_tiny_model

FAMILIES = list(MODEL_FAMILIES)
HOOK = "blocks.1.hook_resid_pre"  # the middle of the 2-layer models
D_MODEL, N_LAYERS = 64, 2
CTX, BATCH = 16, 4
TL_MAJOR = transformer_lens_version()[0]
REL = 1e-4


def _skip_reason(family: str) -> str | None:
    """Why the installed transformers / TransformerLens cannot run `family` at all, or None."""
    import transformers

    config_name, model_name, _ = MODEL_FAMILIES[family]
    for name in (config_name, model_name):
        if not hasattr(transformers, name):
            return f"transformers {transformers.__version__} has no {name}"
    try:
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    except ImportError:  # no TransformerBridge (TL < 3.9): HookedTransformer must load it
        return None
    if model_name not in SUPPORTED_ARCHITECTURES:
        return f"transformer-lens {'.'.join(map(str, transformer_lens_version()))}'s bridge has no {model_name}"
    return None


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory):
    # A neutral directory name: TL 3.x's HookedTransformer picks some architectures by the name
    # ("llama", "gemma" in a path), which would hide whether it loads the directory by its config.
    return save_tiny_model(tmp_path_factory.mktemp(f"family{FAMILIES.index(family)}"), family,
                           n_layers=N_LAYERS, d_model=D_MODEL)


@pytest.fixture(scope="module")
def lm(model_dir):
    return LanguageModel.load(str(model_dir))  # api auto


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))


def logit_free(lm, hidden):
    """cap(hidden @ W_U + b_U): the logits fastsae's KL and CE compute without building them."""
    out = hidden @ lm.W_U
    if lm.b_U is not None:
        out = out + lm.b_U
    cap = lm.logit_softcap
    return out if cap is None else cap * torch.tanh(out / cap)


def assert_rel_close(actual, expected, rel, what):
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert diff <= rel * scale, f"{what}: max difference {diff:.3g} at values up to {scale:.3g}"


def test_loads_with_the_families_shapes(family, lm, hf_model):
    assert lm.api == "bridge" if TL_MAJOR >= 4 else lm.api in ("hooked", "bridge")
    assert (lm.n_layers, lm.d_model) == (N_LAYERS, D_MODEL)
    assert lm.d_vocab == hf_model.config.vocab_size and lm.tokenizer is not None
    assert lm.W_U.shape == (D_MODEL, lm.d_vocab)
    assert all(not p.requires_grad for p in lm.model.parameters())
    expected_cap = getattr(hf_model.config, "final_logit_softcapping", None)
    assert lm.logit_softcap == expected_cap


@pytest.mark.skipif(TL_MAJOR >= 4, reason="TL 4.x has only the bridge: no fallback to check")
def test_tl3_falls_back_to_the_bridge_only_where_hooked_transformer_cannot_load(family, model_dir, lm):
    if lm.api == "hooked":
        return  # HookedTransformer loads this family's directory: no fallback
    with pytest.raises(ValueError, match="(?s)HookedTransformer cannot load .*set model.api=bridge"):
        LanguageModel.load(str(model_dir), api="hooked")


def test_identity_splice_is_the_clean_run(family, lm, tokens):
    with torch.no_grad():
        clean, _ = lm.clean_run(tokens)
        spliced, _ = lm.spliced_run(tokens, {HOOK: lambda x: x})
    assert spliced.shape == (*tokens.shape, D_MODEL)
    torch.testing.assert_close(spliced, clean, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # through the model's own forward, with the logits
        torch.testing.assert_close(lm.logits(tokens, {HOOK: lambda x: x}), lm.model(tokens), rtol=1e-6, atol=1e-6)


def test_an_edit_splices_like_run_with_hooks(family, lm, tokens):
    noise = 0.3 * torch.randn(*tokens.shape, D_MODEL, generator=torch.Generator().manual_seed(2))

    def edit(x):
        return 1.5 * x + noise

    with torch.no_grad():
        reference = lm.model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: edit(x))])
        hidden, _ = lm.spliced_run(tokens, {HOOK: edit})
        clean, _ = lm.clean_run(tokens)
    assert (hidden - clean).abs().max() > 1e-2  # the edit changed the output
    assert_rel_close(logit_free(lm, hidden), reference, 1e-5, "spliced logits vs run_with_hooks")


def test_a_run_started_from_the_cached_residual_equals_the_full_run(family, lm, tokens):
    start = lm.start_point(HOOK)
    with torch.no_grad():
        _, cache = lm.clean_run(tokens, [start])

        def edit(x):
            return 0.5 * x + 0.1

        full, _ = lm.spliced_run(tokens, {HOOK: edit})
        # Count calls into block 0's submodules (attention, MLP, norms): the started run must not
        # compute block 0 (the bridge calls the HF block, made an identity, and nothing inside it).
        calls = []
        block0 = lm.model.blocks[0]
        inner = [m for m in getattr(block0, "original_component", block0).modules() if list(m.parameters())][1:]
        handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in inner]
        try:
            started, _ = lm.spliced_run(tokens, {HOOK: edit}, start_hook=start, start_acts=cache[start])
        finally:
            for handle in handles:
                handle.remove()
        assert inner and calls == []
        torch.testing.assert_close(started, full, rtol=1e-6, atol=1e-6)
        # the skipped blocks are restored: a plain run afterwards is the clean model
        assert_rel_close(logit_free(lm, lm.clean_run(tokens)[0]), lm.model(tokens), 1e-5, "clean run after a started run")


def test_the_logit_free_path_reproduces_the_hf_models_logits(family, lm, hf_model, tokens):
    lm.check_logit_free_path()
    with torch.no_grad():
        hidden, _ = lm.clean_run(tokens)
        ours = logit_free(lm, hidden)
        theirs = hf_model(tokens).logits
    assert ours.shape == theirs.shape
    assert_rel_close(ours, theirs, REL, "cap(final_hidden @ W_U + b_U) vs the HF model's logits")
    if lm.logit_softcap is not None:  # the cap does shape these logits: a missing cap would show
        uncapped = hidden @ lm.W_U + (lm.b_U if lm.b_U is not None else 0)
        assert (uncapped - theirs).abs().max() > 100 * REL * theirs.abs().max()


def _reference_kl_ce(lm, sae, batches):
    """Token-weighted means over the eval batches of KL(p_orig || p_sae), CE orig and CE with the
    SAE spliced, from the model's own (full) logits."""
    kl = ce_orig = ce_sae = 0.0
    with torch.no_grad():
        for tokens in batches:
            orig = torch.log_softmax(lm.logits(tokens).float(), -1)
            spliced = torch.log_softmax(lm.logits(tokens, {HOOK: lambda a: sae(a)}).float(), -1)
            kl += (orig.exp() * (orig - spliced)).sum(-1).mean().item()
            labels = tokens[:, 1:]
            ce_orig += -orig[:, :-1].gather(-1, labels.unsqueeze(-1)).mean().item()
            ce_sae += -spliced[:, :-1].gather(-1, labels.unsqueeze(-1)).mean().item()
    n = len(batches)
    return kl / n, ce_orig / n, ce_sae / n


def test_two_e2e_steps_train_and_eval_kl_ce_match_the_logits(family, model_dir, lm, tmp_path):
    data, eval_data = random_batches(2, BATCH, CTX, seed=0), random_batches(2, BATCH, CTX, seed=99)
    config = load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{HOOK}]", "saes.n_latents=128", f"optim.batch_size={BATCH}",
        f"data.context_length={CTX}", f"optim.n_tokens={2 * BATCH * CTX}", "optim.warmup_samples=0",
        "optim.lr=3e-3", f"eval.n_tokens={2 * BATCH * CTX}", f"eval.batch_size={BATCH}", "log.every=1",
        "log.progress=false", f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, model=lm, dataset=data, eval_dataset=eval_data)
    sae = trainer.saes[HOOK]
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    final = trainer.fit()

    losses = [r["loss"] for r in read_metrics(trainer.run_dir) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert trainer.step_count == 2
    for name, p in sae.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"

    kl, ce_orig, ce_sae = _reference_kl_ce(lm, sae, eval_data)
    assert kl > 1e-3  # a real difference between the runs, not rounding
    assert final["eval/kl"] == pytest.approx(kl, rel=REL)
    assert final["eval/ce_orig"] == pytest.approx(ce_orig, rel=REL)
    assert final["eval/ce_sae"] == pytest.approx(ce_sae, rel=REL)
