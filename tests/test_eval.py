"""Eval metrics as the paper's code defines them, the downstream reconstruction at every later
block, eval.json (from Trainer.evaluate, fit and `fastsae eval`), and the paper's LR schedule."""

import json
import math

import pytest
import torch

from fastsae.cli import main
from fastsae.train import Trainer, load_config
from fastsae.train import losses
from fastsae.train.metrics import read_eval_json, run_objective
from fastsae.train.setup import lr_factor
from helpers_models import random_batches

CTX, BATCH = 16, 4
HOOK = "blocks.1.hook_resid_pre"


def batches(n, seed=0, vocab=250):
    return random_batches(n, BATCH, CTX, seed=seed, vocab=vocab)


def make_config(tmp_path, model_dir, *overrides):
    return load_config({}, [
        f"model.name={model_dir}", f"saes.hooks=[{HOOK}]", "saes.n_latents=64",
        f"optim.batch_size={BATCH}", f"data.context_length={CTX}", f"optim.n_tokens={3 * BATCH * CTX}",
        "optim.warmup_samples=4", "optim.lr=3e-3", f"eval.n_tokens={2 * BATCH * CTX}", f"eval.batch_size={BATCH}",
        "log.every=1", "log.progress=false", f"run_dir={tmp_path / 'run'}", *overrides])


# ------------------------------------------------------------------ explained variance

def _paper_explained_variance(pred, target):
    # e2e_sae.losses.calc_explained_variance(pred, target).mean(), written out from its source
    sample_dims = tuple(range(pred.ndim - 1))
    per_token_l2_loss = (pred - target).pow(2).sum(dim=-1)
    total_variance = (target - target.mean(dim=sample_dims)).pow(2).sum(dim=-1)
    return (1 - per_token_l2_loss / total_variance).mean()


def test_explained_variance_is_the_papers_per_token_mean_not_a_ratio_of_sums():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g) * torch.linspace(0.2, 3, 7).view(1, 7, 1)  # tokens of unequal size
    x_hat = x + 0.5 * torch.randn(3, 7, 16, generator=g)
    ours = losses.explained_variance(x, x_hat)
    torch.testing.assert_close(ours, _paper_explained_variance(x_hat, x))
    x2, r2 = x.reshape(-1, 16), x_hat.reshape(-1, 16)
    ratio_of_sums = 1 - (x2 - r2).pow(2).sum() / (x2 - x2.mean(0)).pow(2).sum()
    assert abs(ours.item() - ratio_of_sums.item()) > 0.05  # the two definitions differ here


# ------------------------------------------------------------------ the LR schedule

def _paper_lr_lambda(step, num_warmup_steps, num_training_steps, min_lr_factor, num_cycles=0.5):
    # e2e_sae.utils._get_cosine_schedule_with_warmup_lr_lambda, written out from its source
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(min_lr_factor, min_lr_factor + (1 - min_lr_factor) * 0.5 * (
        1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def test_lr_factor_equals_the_papers_schedule_at_every_step():
    for warmup, total, floor in [(10, 110, 0.1), (0, 50, 0.0), (3, 7, 0.5), (20, 20, 0.1)]:
        for step in range(total + 3):
            assert lr_factor(step, warmup, total, floor) == pytest.approx(
                _paper_lr_lambda(step, warmup, total, floor), abs=1e-12), (warmup, total, step)
    assert lr_factor(0, 10, 110, 0.1) == 0.0


def test_trainer_schedule_uses_the_papers_rounding(tmp_path, model_dir, lm):
    # warmup_samples // batch_size and n_samples // batch_size, both rounded down
    cfg = make_config(tmp_path, model_dir, "optim.warmup_samples=10", f"optim.n_tokens={int(5.5 * BATCH * CTX)}")
    trainer = Trainer(cfg, model=lm)
    assert cfg.warmup_steps == 10 // BATCH and cfg.total_steps == 6
    lrs = []
    for tokens in batches(6):
        lrs.append(trainer.step(tokens)["lr"])
    expected = [cfg.optim.lr * _paper_lr_lambda(s, 10 // BATCH, 5, cfg.optim.min_lr_factor) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == 0.0


# ------------------------------------------------------------------ eval: downstream, eval.json

def test_reconstruction_hooks_are_every_later_block_and_the_final_residual(tmp_path, model_dir, lm):
    trainer = Trainer(make_config(tmp_path, model_dir), model=lm)
    assert trainer.reconstruction_hooks() == ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
    last = Trainer(make_config(tmp_path, model_dir, "saes.hooks=[blocks.2.hook_resid_post]"), model=lm)
    assert last.reconstruction_hooks() == []  # the SAE is the final residual itself


@pytest.mark.parametrize("objective,overrides", [
    ("local", ["loss.kl_coeff=0", "loss.local_mse_coeff=1"]),
    ("e2e", []),
    ("e2e+ds", ["loss.kl_coeff=0.5", "loss.downstream_coeff=2.5", "loss.downstream_hooks=[blocks.2.hook_resid_pre]"]),
])
def test_eval_reports_downstream_reconstruction_and_writes_eval_json(tmp_path, model_dir, lm, objective, overrides):
    cfg = make_config(tmp_path, model_dir, *overrides)
    data = batches(3)
    eval_data = batches(2, seed=1)
    trainer = Trainer(cfg, model=lm, dataset=data, eval_dataset=eval_data, run_dir=tmp_path / "run")
    metrics = trainer.fit()
    record = read_eval_json(tmp_path / "run")
    assert record["objective"] == objective == run_objective(cfg.to_dict()) and "kind" not in record
    assert record["step"] == 3 and record["training_tokens"] == 3 * BATCH * CTX
    assert record["eval_tokens"] == 2 * BATCH * CTX and record["n_latents"] == 64
    assert record["sparsity_coeff"] == cfg.loss.sparsity_coeff and record["hooks"] == [HOOK]
    assert record["metrics"]["l0"] == pytest.approx(metrics["eval/l0"])
    for name in ("kl", "ce_increase", "l0", f"alive/{HOOK}", f"explained_variance/{HOOK}"):
        assert name in record["metrics"]

    # the downstream numbers equal a direct computation on the eval batches
    sae = trainer.saes[HOOK]
    final = "blocks.2.hook_resid_post"
    mse_sum = ev_sum = 0.0
    fire_counts = torch.zeros(sae.n_latents, dtype=torch.int64)

    def splice(a):
        nonlocal fire_counts
        reconstruction, code = sae(a, return_code=True)
        fire_counts += (code.reshape(-1, sae.n_latents) > 0).sum(0)
        return reconstruction

    with torch.no_grad():
        for tokens in eval_data:
            clean = {}
            lm.logits(tokens, {final: lambda a: clean.setdefault("x", a)})
            spliced = {}
            lm.logits(tokens, {HOOK: splice, final: lambda a: spliced.setdefault("x", a)})
            mse_sum += losses.mse_loss(spliced["x"], clean["x"]).item()
            ev_sum += _paper_explained_variance(spliced["x"], clean["x"]).item()
    assert record["metrics"][f"downstream_mse/{final}"] == pytest.approx(mse_sum / 2, rel=1e-4)
    assert record["metrics"][f"downstream_explained_variance/{final}"] == pytest.approx(ev_sum / 2, rel=1e-4, abs=1e-5)
    assert "downstream_mse/blocks.2.hook_resid_pre" in record["metrics"]
    # alive and rare latents: the eval's per-latent fire counts equal the SAE's code on the eval tokens
    assert record["metrics"][f"alive/{HOOK}"] == int((fire_counts > 0).sum())
    assert record["metrics"][f"rare/{HOOK}"] == int((fire_counts < 1e-3 * 2 * BATCH * CTX).sum())


def test_evaluate_writes_only_into_an_existing_run_dir(tmp_path, model_dir, lm):
    trainer = Trainer(make_config(tmp_path, model_dir), model=lm, eval_dataset=batches(1),
                      run_dir=tmp_path / "not_yet")
    trainer.evaluate()
    assert not (tmp_path / "not_yet").exists()
    (tmp_path / "not_yet").mkdir()
    trainer.evaluate(write=False)
    assert not (tmp_path / "not_yet" / "eval.json").exists()
    trainer.evaluate()
    assert json.loads((tmp_path / "not_yet" / "eval.json").read_text())["step"] == 0


def test_cli_eval_writes_eval_json_with_the_checkpoints_step(tmp_path, model_dir, lm, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    cfg = make_config(tmp_path, model_dir, "data.source=text", f"data.path={text}", "data.eval_fraction=0.3")
    trainer = Trainer(cfg, model=lm)
    trainer.fit()
    (tmp_path / "run" / "eval.json").unlink()
    assert main(["eval", str(tmp_path / "run"), "--tokens", str(BATCH * CTX)]) == 0
    record = read_eval_json(tmp_path / "run")
    assert record["step"] == 3 and record["eval_tokens"] == BATCH * CTX
    assert "eval.json" in capsys.readouterr().out


def test_an_eval_json_written_with_kind_reads_as_objective(tmp_path):
    """eval.json files written before "objective" was the word hold it as "kind"."""
    from fastsae.train import metrics

    (tmp_path / "eval.json").write_text(json.dumps({"kind": "e2e+ds", "sparsity_coeff": 1.0, "metrics": {}}))
    record = read_eval_json(tmp_path)
    assert record["objective"] == "e2e+ds" and "kind" not in record
    assert metrics.with_objective({"objective": "local"}) == {"objective": "local"}
    with pytest.warns(DeprecationWarning, match="now OBJECTIVES"):
        assert metrics.RUN_KINDS == metrics.OBJECTIVES == ("local", "e2e", "e2e+ds")
    with pytest.warns(DeprecationWarning, match="now run_objective"):
        assert metrics.run_kind is metrics.run_objective
