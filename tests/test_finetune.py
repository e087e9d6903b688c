"""`fastsae finetune` (fastsae.train.finetune) and the balanced KL + MSE loss it trains (loss.balance).

The SAEs are fine-tuned on the embedded model's code path: a tiny build of it (the same pretraining
and corpus, a 2-layer GPT-2 of width 32) with the embedded data. The SAELens and sparsify inputs
are written here as those tools write them (no sae-lens or sparsify needed), as tests/test_formats.py
does; a fastsae run is trained here.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from fastsae import E2ESAE, formats
from fastsae.activations import ACTIVATIONS
from fastsae.cli import main
from fastsae.model.embedded import EmbeddedConfig, ensure_embedded_model
from fastsae.train import Trainer, finetune, load_config, setup
from fastsae.train.config import ConfigError
from test_releases import hub  # noqa: F401  (the fake hub and its registry: a fixture)

TINY = EmbeddedConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_ctx=32, steps=3, batch_size=4,
                      warmup_steps=1, max_corpus_chars=8000)
D, N, K = 32, 64, 4
HOOK = "blocks.1.hook_resid_pre"
# small steps and a short eval on the tiny model (its context is 32 tokens)
SMALL = ["device=cpu", "data.context_length=32", "optim.batch_size=4", "eval.n_tokens=256", "eval.batch_size=4",
         "log.progress=false", "log.every=1"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return ensure_embedded_model(tmp_path_factory.mktemp("cache"), config=TINY, progress=False)


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(N, D, generator=g)
    return {"W_enc": torch.randn(D, N, generator=g) / 4, "b_enc": torch.randn(N, generator=g) / 8,
            "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True), "b_dec": torch.randn(D, generator=g) / 4}


def write_saelens_relu(path, seed=0):
    """A SAELens 6 "standard" (ReLU) directory as SAE.save_model writes it (unit decoder rows)."""
    path.mkdir(parents=True)
    save_file(_tensors(seed), str(path / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.0", "hook_name": HOOK, "model_name": "tiny-embedded"}}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def write_sparsify_topk(path, seed=1):
    """A sparsify 1.x SparseCoder directory (cfg.json + sae.safetensors), named by its hookpoint."""
    t = _tensors(seed)
    path.mkdir(parents=True)
    save_file({"encoder.weight": t["W_enc"].t().contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}, str(path / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": N // D, "normalize_decoder": True, "num_latents": N, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_cli(capsys, *argv):
    code = main(["finetune", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def check_before_and_after(run_dir):
    record = json.loads((run_dir / "eval.json").read_text())
    before, after = record["before"], record["metrics"]
    for key in ("ce_increase", "kl", f"l0/{HOOK}", f"explained_variance/{HOOK}"):
        assert math.isfinite(before[key]) and math.isfinite(after[key]), key
    assert before["tokens"] == after["tokens"]  # the same held-out tokens
    assert record["finetune"]["sources"][0]["hook"] == HOOK
    return record


# ------------------------------------------------------------------------------------ the balance

def _objective_step(model_path, overrides):
    cfg = load_config("embedded-finetune", [f"model.name={model_path}", f"saes.hooks=[{HOOK}]", "saes.n_latents=64",
                                            *SMALL, *overrides])
    trainer = Trainer(cfg, run_dir=None)
    tokens = next(iter(setup.build_stream(cfg, trainer.lm, "train", 4)))
    loss, metrics, _ = trainer.objective(tokens, train=True)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.params]
    return loss.detach(), metrics, grads


def test_the_balance_makes_the_halves_equal_and_keeps_the_named_scale(model_path):
    loss, m, grads = _objective_step(model_path, ["loss.balance=mse", "loss.local_mse_coeff=2.0"])
    kl, mse = m["kl"], m[f"mse/{HOOK}"]
    assert torch.allclose(m["loss/kl"], m["loss/local_mse"], rtol=1e-5)  # neither dominates
    assert torch.allclose(m["loss/local_mse"] + m["loss/kl"], 2.0 * mse, rtol=1e-5)  # the MSE's scale
    assert torch.allclose(m["kl_weight"], mse / kl, rtol=1e-5) and float(m["local_mse_weight"]) == 1.0
    # the ratio is a constant of the step (detached): the same gradients as fixed coefficients of its value
    fixed_loss, _, fixed = _objective_step(model_path, ["loss.balance=null", f"loss.kl_coeff={float(m['kl_weight'])!r}",
                                                        "loss.local_mse_coeff=1.0"])
    assert torch.allclose(fixed_loss, loss, rtol=1e-5)
    for a, b in zip(grads, fixed):
        assert rel_err(a, b) < 1e-4

    _, m, _ = _objective_step(model_path, ["loss.balance=kl", "loss.kl_coeff=3.0"])
    assert torch.allclose(m["loss/kl"], m["loss/local_mse"], rtol=1e-5)
    assert torch.allclose(m["loss/kl"] + m["loss/local_mse"], 3.0 * m["kl"], rtol=1e-5)  # the KL's scale


def test_the_balance_needs_both_losses():
    with pytest.raises(ConfigError, match="loss.balance='mse' balances the KL against the local MSE"):
        load_config("embedded-finetune", ["loss.local_mse_coeff=0"])
    with pytest.raises(ConfigError, match="allowed values: null, 'mse', 'kl'"):
        load_config("embedded-finetune", ["loss.balance=both"])


# ------------------------------------------------------------------------------------ the formats

def test_a_saelens_sae_is_finetuned_and_written_back_as_saelens(tmp_path, model_path, capsys):
    source = write_saelens_relu(tmp_path / "released")
    run_dir = tmp_path / "run"
    code, out = run_cli(capsys, str(source), "--model", str(model_path), "--config", "embedded-finetune",
                        "--tokens", "512", "--run-dir", str(run_dir), *sum((["--set", s] for s in SMALL), []))
    assert code == 0, out
    assert "ce_increase (CE-loss gap)" in out and "before" in out and "after" in out
    assert "do not record the sparsity coefficient" in out  # a SAELens ReLU file: the preset's
    record = check_before_and_after(run_dir)
    assert record["finetune"]["budget"]["tokens"] == 512
    assert record["finetune"]["coefficients"]["balance"] == "mse"

    written = run_dir / "finetuned" / HOOK
    assert formats.detect_format(written) == "saelens"  # SAELens in, SAELens out
    assert json.loads((written / "cfg.json").read_text())["architecture"] == "standard"
    tuned = E2ESAE.from_pretrained(written)
    original = E2ESAE.from_pretrained(source)
    trained = E2ESAE.from_pretrained(run_dir, hook=HOOK)  # the run's own checkpoint
    x = torch.randn(16, D)
    assert tuned.metadata["hook"] == HOOK and tuned.activation == "relu"
    assert rel_err(tuned(x), trained(x)) < 1e-5
    assert rel_err(tuned(x), original(x)) > 1e-4  # it trained


def test_a_sparsify_sae_is_finetuned_and_written_back_as_sparsify(tmp_path, model_path, capsys):
    source = write_sparsify_topk(tmp_path / "released" / "layers.0")  # sparsify's name for blocks.1.hook_resid_pre
    run_dir = tmp_path / "run"
    code, out = run_cli(capsys, str(source), "--model", str(model_path), "--config", "embedded-finetune",
                        "--tokens", "512", "--run-dir", str(run_dir), *sum((["--set", s] for s in SMALL), []))
    assert code == 0, out
    record = check_before_and_after(run_dir)
    for metrics in (record["before"], record["metrics"]):
        assert metrics[f"l0/{HOOK}"] == pytest.approx(K, abs=0.1)
    assert record["finetune"]["coefficients"]["sparsity_coeff"]["value"] == 0.0  # TopK: no penalty, as sparsify

    written = run_dir / "finetuned" / "layers.0"
    assert formats.detect_format(written) == "sparsify"  # sparsify in, sparsify out
    tuned = E2ESAE.from_pretrained(written)
    assert (tuned.metadata["hook"], tuned.activation, tuned.k) == (HOOK, "topk", K)
    x = torch.randn(16, D)
    assert rel_err(tuned(x), E2ESAE.from_pretrained(run_dir, hook=HOOK)(x)) < 1e-5
    assert rel_err(tuned(x), E2ESAE.from_pretrained(source)(x)) > 1e-4


# ------------------------------------------------------------------------------------ fastsae runs

def _train_run(model_path, run_dir, *overrides, steps=3):
    cfg = load_config("embedded-local", [f"model.name={model_path}", f"saes.hooks=[{HOOK}]", "saes.ratio=2",
                                         *SMALL, f"optim.n_tokens={steps * 4 * 32}", *overrides])
    Trainer(cfg, run_dir=run_dir).fit()
    return run_dir


def test_a_fastsae_run_passes_on_its_coefficients_and_budget(tmp_path, model_path):
    local = _train_run(model_path, tmp_path / "local", "loss.sparsity_coeff=2.5", "loss.local_mse_coeff=3.0")
    source = finetune.load_source(str(local))
    assert (source.format, source.training_tokens, source.hook) == ("fastsae", 3 * 128, HOOK)
    cfg, decided = finetune.finetune_config([source], model=str(model_path), config="embedded-finetune")
    assert (cfg.loss.balance, cfg.loss.local_mse_coeff, cfg.loss.sparsity_coeff) == ("mse", 3.0, 2.5)
    assert cfg.optim.n_tokens == math.ceil(finetune.PAPER_SHARE * 3 * 128)  # the paper's share by default
    assert decided["coefficients"]["sparsity_coeff"]["from"] == "source run"
    assert decided["lr"] == {"value": pytest.approx(2e-4), "from": "the source run's final lr"}  # 2e-3 x 0.1
    assert (cfg.saes.hooks, cfg.saes.n_latents, cfg.saes.activation) == ([HOOK], 64, "relu")
    cfg, _ = finetune.finetune_config([source], model=str(model_path), config="embedded-finetune", fraction=0.5,
                                      overrides=["optim.lr=1e-4"])
    assert (cfg.optim.n_tokens, cfg.optim.lr) == (192, 1e-4)

    e2e = _train_run(model_path, tmp_path / "e2e", "loss.kl_coeff=0.7", "loss.local_mse_coeff=0")
    cfg, decided = finetune.finetune_config([finetune.load_source(str(e2e))], model=str(model_path),
                                            config="embedded-finetune")
    assert (cfg.loss.balance, cfg.loss.kl_coeff) == ("kl", 0.7)  # an e2e run keeps its KL's scale
    with pytest.raises(ConfigError, match="no fine-tune preset for model"):
        finetune.finetune_config([source], model="some/model")


def test_an_interrupted_finetune_resumes_and_finishes(tmp_path, model_path, capsys):
    local = _train_run(model_path, tmp_path / "local")
    run_dir = tmp_path / "ft"
    code, out = run_cli(capsys, str(local), "--model", str(model_path), "--config", "embedded-finetune",
                        "--tokens", "384", "--run-dir", str(run_dir), "--max-steps", "1",
                        *sum((["--set", s] for s in SMALL), []))
    assert code == 0 and "fastsae finetune --resume" in out, out
    assert not (run_dir / "finetuned").exists()
    before = json.loads((run_dir / "finetune.json").read_text())["before"]
    code, out = run_cli(capsys, "--resume", str(run_dir))
    assert code == 0, out
    record = check_before_and_after(run_dir)
    assert record["before"] == before and record["step"] == 3
    assert formats.detect_format(run_dir / "finetuned" / HOOK) == "fastsae"  # fastsae in, fastsae out
    # a used run directory is refused, as `fastsae train` refuses it
    code, out = run_cli(capsys, str(local), "--model", str(model_path), "--config", "embedded-finetune",
                        "--run-dir", str(run_dir), *sum((["--set", s] for s in SMALL), []))
    assert code == 2 and "already holds a run" in out


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_kind_finetunes_with_its_own_terms(tmp_path, model_path, name):
    """Any kind: its training pass and loss terms, the balanced KL + MSE, written back (fastsae in,
    fastsae out). The conformance suite's size and example hyperparameters."""
    torch.manual_seed(0)
    sae = E2ESAE(D, 24, name, metadata={"hook": HOOK, "model": str(model_path)}, **ACTIVATIONS[name].example_params)
    with torch.no_grad():
        sae.b_enc.add_(0.2)  # a code that is not empty
    source = sae.save_pretrained(tmp_path / "sae")
    lines = []
    record = finetune.finetune([str(source)], config="embedded-finetune", tokens=256, overrides=SMALL,
                               run_dir=tmp_path / "run", log=lines.append)
    assert record["before"]["tokens"] == record["after"]["tokens"]
    assert any("CE-loss gap" in line for line in lines)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert steps and all("loss/kl" in m and "loss/local_mse" in m for m in steps)
    # the kind's sparsity term at the preset's coefficient, or none for a kind that selects k latents
    assert all(("loss/sparsity" in m) == (sae.k is None) for m in steps)
    written = tmp_path / "run" / "finetuned" / HOOK
    assert formats.detect_format(written) == "fastsae"
    tuned = E2ESAE.from_pretrained(written)
    assert (tuned.activation, tuned.spec.hyperparameters()) == (name, sae.spec.hyperparameters())
    assert not torch.equal(tuned.W_enc, sae.W_enc)


def test_an_e2e_sae_run_passes_on_its_training_and_comes_back_as_fastsae(tmp_path, model_path):
    import yaml

    from test_formats import write_e2e_sae_run

    write_e2e_sae_run(tmp_path / "e2e_sae", [HOOK], samples=(100,), d=D)
    config_path = tmp_path / "e2e_sae" / "final_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config.update(n_samples=400, train_data={"n_ctx": 32}, lr=5e-4, min_lr_factor=0.1, lr_schedule="cosine",
                  loss={"sparsity": {"coeff": 0.5, "p_norm": 1.0}, "logits_kl": {"coeff": 1.0}, "out_to_in": None,
                        "in_to_orig": None})
    config_path.write_text(yaml.dump(config))
    source = finetune.load_source(f"{tmp_path / 'e2e_sae'}@{HOOK}")
    assert (source.format, source.found, source.training_tokens) == ("fastsae", "e2e_sae", 400 * 32)
    cfg, decided = finetune.finetune_config([source], model=str(model_path), config="embedded-finetune")
    assert (cfg.loss.balance, cfg.loss.kl_coeff, cfg.loss.sparsity_coeff) == ("kl", 1.0, 0.5)  # an e2e run's
    assert cfg.optim.lr == pytest.approx(5e-5) and cfg.optim.n_tokens == 640  # its final lr, 5 % of its tokens
    record = finetune.finetune([f"{tmp_path / 'e2e_sae'}@{HOOK}"], model=str(model_path), config="embedded-finetune",
                               tokens=128, overrides=SMALL, run_dir=tmp_path / "run", log=lambda line: None)
    written = tmp_path / "run" / "finetuned" / HOOK  # e2e_sae is read only: written in fastsae's format
    assert formats.detect_format(written) == "fastsae" and record["after"]["tokens"] == record["before"]["tokens"]


# ------------------------------------------------------------------------------------ released SAEs

@pytest.mark.parametrize("release, written_as", [("test-saelens", "saelens"), ("test-sparsify", "sparsify"),
                                                 ("test-fastsae", "fastsae"), ("test-e2e-sae", "fastsae")])
def test_a_release_by_name_is_a_source_in_its_own_format(hub, release, written_as):
    sae_id, path = hub[0][release]
    source = finetune.load_source(f"{release}:{sae_id}")
    assert source.format == written_as  # e2e_sae is read only: written back in fastsae's format
    hook = sae_id if release == "test-e2e-sae" else None
    from_file = E2ESAE.from_pretrained(path, hook=hook)
    for name in from_file.tensor_names():
        assert torch.equal(getattr(source.sae, name), getattr(from_file, name)), name
    assert source.hook == E2ESAE.from_pretrained(release, sae_id=sae_id).metadata["hook"]  # the release's name for it
    assert source.spec == f"{release}:{sae_id}"
    # the fine-tune makes a new SAE: the release's identity is kept aside, not as the SAE's own
    assert "release" not in source.sae.metadata and source.sae.metadata["from_release"]["release"] == release


def test_resume_refuses_what_would_change_the_finetune(capsys):
    code = main(["finetune", "--resume", "runs/nowhere", "--tokens", "1000", "--model", "embedded"])
    assert code == 2 and "--model, --tokens cannot change it" in capsys.readouterr().err
