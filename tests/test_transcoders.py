"""Transcoders in training: the hooks IN->OUT, the spliced run, local / e2e / e2e+ds, and refusals.

A transcoder reads IN (an MLP's input) and replaces OUT (its output). Checked here, on the tiny
GPT-2 of the trainer tests: the spliced run equals TransformerLens's run_with_hooks with OUT
replaced by the transcoder of IN; local training reads both hooks of one clean run and its MSE is
against OUT's activation; an e2e and an e2e+ds step lower their losses; widths follow the hooks
(d_out = d_mlp for the MLP's hidden layer); bad hook lists are refused by name. The kinds' own
terms with a transcoder's target, with and without the skip path, are in the conformance suite
(tests/test_activations.py).
"""

import pytest
import torch

from fastsae.spec import hook_in_out, transcoder_hook
from fastsae.train import Trainer, load_config
from fastsae.train.config import ConfigError
from fastsae.train.objective import Batch
from helpers_models import random_batches

CTX, BATCH = 16, 4
IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
HOOK = f"{IN}->{OUT}"


def make_config(tmp_path, model_dir, *overrides, hooks=(HOOK,)):
    return load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{', '.join(hooks)}]", "saes.n_latents=64", "saes.activation=topk",
        "saes.k=4", "loss.sparsity_coeff=0", f"optim.batch_size={BATCH}", f"data.context_length={CTX}",
        f"optim.n_tokens={6 * BATCH * CTX}", "optim.warmup_samples=8", "optim.lr=3e-3", "eval.n_tokens=128",
        "log.every=1", "log.progress=false", "log.dead_window_tokens=128", f"run_dir={tmp_path / 'run'}",
        *overrides])


def test_hook_names_split_and_join():
    assert hook_in_out(HOOK) == (IN, OUT)
    assert hook_in_out(IN) == (IN, IN)
    assert transcoder_hook(IN, OUT) == HOOK and transcoder_hook(IN, IN) == IN and transcoder_hook(IN, None) == IN
    for bad in (f"{IN}->", f"->{OUT}", f"{IN}->{IN}", f"{IN}->{OUT}->{IN}"):
        with pytest.raises(ValueError, match="IN->OUT"):
            hook_in_out(bad)


@pytest.mark.parametrize("skip", [False, True])
def test_the_spliced_run_equals_run_with_hooks_with_the_mlp_output_replaced(tmp_path, model_dir, lm, skip):
    trainer = Trainer(make_config(tmp_path, model_dir, f"saes.skip={skip}"), model=lm)
    tokens = random_batches(1, BATCH, CTX, seed=0, vocab=250)[0]
    for _ in range(2):  # trained a little, so the transcoder is not at its init (W_skip moves off 0)
        trainer.step(tokens)
    transcoder = trainer.saes[HOOK]
    assert transcoder.is_transcoder and (transcoder.W_skip is not None) == skip
    if skip:
        assert transcoder.W_skip.abs().sum() > 0
    batch = Batch(tokens, train=False)
    with torch.no_grad():
        _, clean = lm.clean_run(tokens, [trainer.start_hook])
        hidden, _ = lm.spliced_run(tokens, trainer.objective.replacements(batch), start_hook=trainer.start_hook,
                                   start_acts=clean[trainer.start_hook])
        logits = hidden @ lm.W_U + lm.b_U
        seen = {}
        hooks = [(IN, lambda acts, hook: seen.update(x=acts)),
                 (OUT, lambda acts, hook: transcoder(seen["x"]))]
        reference = lm.model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert trainer.start_hook == "blocks.1.hook_resid_pre"  # the spliced run starts at IN's block
    assert torch.allclose(logits, reference, atol=1e-5), (logits - reference).abs().max()
    # the target is the MLP's own output in that run, which the transcoder replaced
    mlp_out = lm.activations(tokens, [OUT])[OUT]
    torch.testing.assert_close(batch.saes[HOOK].target, mlp_out)
    torch.testing.assert_close(batch.saes[HOOK].x, lm.activations(tokens, [IN])[IN])


def test_local_training_matches_the_mlp_output(tmp_path, model_dir, lm):
    trainer = Trainer(make_config(tmp_path, model_dir, "loss.kl_coeff=0", "loss.local_mse_coeff=1"), model=lm)
    tokens = random_batches(1, BATCH, CTX, seed=0, vocab=250)[0]
    history = [trainer.step(tokens) for _ in range(8)]
    mse = [m["loss/local_mse"] for m in history]
    assert mse[-1] < 0.8 * mse[0], mse
    assert "kl" not in history[-1]  # a local step runs no spliced pass
    transcoder = trainer.saes[HOOK]
    acts = lm.activations(tokens, [IN, OUT])
    with torch.no_grad():
        want = (transcoder(acts[IN]) - acts[OUT]).square().mean()
        _, metrics, _ = trainer.objective(tokens, train=True)
    assert metrics[f"mse/{HOOK}"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("mode", ["e2e", "e2e+ds"])
def test_e2e_and_e2e_ds_steps_lower_their_loss(tmp_path, model_dir, lm, mode):
    extra = [] if mode == "e2e" else ["loss.kl_coeff=0.5", "loss.downstream_coeff=2.5",
                                       "loss.downstream_hooks=[blocks.2.hook_resid_pre]"]
    trainer = Trainer(make_config(tmp_path, model_dir, "saes.skip=true", *extra), model=lm)
    tokens = random_batches(1, BATCH, CTX, seed=0, vocab=250)[0]
    history = [trainer.step(tokens) for _ in range(8)]
    main = [m["loss"] - m.get("loss/auxk", 0.0) for m in history]
    assert main[-1] < 0.8 * main[0], main
    assert {"kl", "ce_increase", f"explained_variance/{HOOK}", f"l0/{HOOK}"} <= set(history[-1])
    if mode == "e2e+ds":
        assert "loss/downstream" in history[-1]


def test_widths_follow_the_hooks(tmp_path, model_dir, lm):
    # the MLP's hidden layer (d_mlp = 4 x d_model) as OUT: a transcoder writing 128 from 32
    hook = "blocks.1.ln2.hook_normalized->blocks.1.mlp.hook_post"
    trainer = Trainer(make_config(tmp_path, model_dir, hooks=(hook,)), model=lm)
    transcoder = trainer.saes[hook]
    assert (transcoder.d_in, transcoder.d_out) == (lm.d_model, 4 * lm.d_model)
    tokens = random_batches(1, BATCH, CTX, seed=0, vocab=250)[0]
    assert trainer.step(tokens)["loss"] > 0


@pytest.mark.parametrize("hooks, message", [
    ([f"{OUT}->{IN}"], "earlier block|before"),
    ([HOOK, IN], "used by two coders"),
    ([f"{IN}->blocks.1.nonexistent"], "unknown hook point"),
])
def test_bad_transcoder_hooks_are_refused_by_name(tmp_path, model_dir, lm, hooks, message):
    config = make_config(tmp_path, model_dir, hooks=hooks)
    with pytest.raises((ConfigError, ValueError), match=message):
        trainer = Trainer(config, model=lm)
        trainer.step(random_batches(1, BATCH, CTX, seed=0, vocab=250)[0])


def test_a_skip_path_is_refused_on_sae_hooks(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="saes.skip"):
        make_config(tmp_path, model_dir, "saes.skip=true", hooks=("blocks.1.hook_resid_pre",))
