"""The training config: presets load, overrides apply, and every kind of error names its key."""

import re

import pytest
import yaml

from fastsae.activations import ACTIVATION_NAMES
from fastsae.spec import activations_with

from fastsae.train.config import (PRESET_DIR, ConfigError, TrainConfig, apply_overrides, list_presets,
                                  load_config, resolve_config_path)

PAPER = {  # the paper's GPT-2 small layer-6 runs
    "gpt2-local": {"sparsity_coeff": 6.0, "local_mse_coeff": 1.0, "kl_coeff": 0.0, "downstream_coeff": 0.0},
    "gpt2-e2e": {"sparsity_coeff": 1.5, "kl_coeff": 1.0, "local_mse_coeff": 0.0, "downstream_coeff": 0.0},
    "gpt2-e2e-ds": {"sparsity_coeff": 1.5, "kl_coeff": 0.5, "local_mse_coeff": 0.0, "downstream_coeff": 2.5},
}


def test_every_preset_loads():
    presets = list_presets()
    assert {"embedded", "embedded-local", *PAPER, "tinystories-e2e"} <= set(presets)
    for name, description in presets.items():
        assert description, f"{name}.yaml needs a first-line comment (its description)"
        config = load_config(name)
        assert config.total_steps >= 1


@pytest.mark.parametrize("name", sorted(PAPER))
def test_gpt2_presets_are_the_papers(name):
    c = load_config(name)
    assert c.model.name == "gpt2" and c.saes.hooks == ["blocks.6.hook_resid_pre"]
    assert c.saes.ratio * 768 == 46_080 and c.saes.activation == "relu"
    assert (c.optim.lr, c.optim.batch_size, c.data.context_length) == (5e-4, 16, 1024)
    assert (c.optim.warmup_samples, c.optim.min_lr_factor, c.optim.max_grad_norm) == (20_000, 0.1, 10.0)
    assert 400_000_000 <= c.optim.n_tokens <= 420_000_000
    for key, value in PAPER[name].items():
        assert getattr(c.loss, key) == value, key
    if name == "gpt2-e2e-ds":
        assert c.loss.downstream_hooks == [f"blocks.{i}.hook_resid_pre" for i in range(7, 12)]
        assert sum(c.downstream_weights().values()) == pytest.approx(2.5)


def test_overrides_are_yaml_and_dotted():
    c = load_config("embedded", ["optim.lr=1e-4", "saes.hooks=[blocks.0.hook_resid_pre]", "amp=bf16",
                                 "saes.n_latents=512", "optim.n_tokens=4.1e8", "wandb.project=null"])
    assert c.optim.lr == 1e-4 and isinstance(c.optim.lr, float)
    assert c.saes.hooks == ["blocks.0.hook_resid_pre"]
    assert c.amp == "bf16" and c.saes.n_latents == 512
    assert c.optim.n_tokens == 410_000_000 and isinstance(c.optim.n_tokens, int)
    assert c.wandb.project is None


def test_round_trip_through_yaml(tmp_path):
    c = load_config("gpt2-e2e-ds", ["seed=3"])
    path = tmp_path / "config.yaml"
    path.write_text(c.to_yaml())
    assert load_config(path) == c
    assert load_config(str(path)).to_dict() == c.to_dict()


def test_defaults_fill_missing_keys():
    c = load_config({"saes": {"hooks": ["blocks.0.hook_resid_pre"]}})
    assert c == TrainConfig(saes=c.saes) and c.optim.lr == 5e-4


def test_paths_and_presets_resolve(tmp_path):
    assert resolve_config_path("embedded") == PRESET_DIR / "embedded.yaml"
    with pytest.raises(ConfigError, match="neither a config file nor a preset.*embedded"):
        resolve_config_path("no-such-preset")
    with pytest.raises(ConfigError, match="no config file"):
        resolve_config_path(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("overrides, message", [
    # unknown keys: named, with the allowed ones listed
    (["optim.lrate=1"], r"unknown key 'optim.lrate'.*allowed keys in optim: n_tokens, batch_size.*lr"),
    (["sparsity=1"], r"unknown key 'sparsity'.*allowed keys in the config: name, seed"),
    (["optim.lr.x=1"], r"optim.lr is a value, not a section"),
    (["optim=3"], r"optim must be a mapping"),
    # bad values: the allowed values or range
    (["saes.activation=gelu"], r"saes.activation='gelu' is not allowed; allowed values: "
                               + re.escape(", ".join(map(repr, ACTIVATION_NAMES)))),
    (["amp=fp16"], r"amp='fp16' is not allowed; allowed values: null, 'bf16'"),
    (["model.dtype=float64"], r"model.dtype='float64' is not allowed"),
    (["optim.lr=-1"], r"optim.lr=-1.0 is out of range; allowed: \[0, inf\]"),
    (["optim.min_lr_factor=2"], r"optim.min_lr_factor=2.0 is out of range; allowed: \[0, 1\]"),
    (["optim.batch_size=0"], r"optim.batch_size=0 is out of range"),
    (["optim.batch_size=two"], r"optim.batch_size must be int, got str"),
    (["optim.batch_size=1.5"], r"optim.batch_size must be int, got float"),
    (["log.progress=3"], r"log.progress must be bool"),
    (["saes.hooks=blocks.1.hook_resid_pre"], r"saes.hooks must be a list of str"),
    (["loss.downstream_coeffs=[a]"], r"loss.downstream_coeffs"),
    (["data.kind=csv"], r"data.kind='csv' is not allowed; allowed values: 'embedded', 'hf', 'text', 'tokens'"),
    # checks across keys
    (["saes.hooks=[]"], r"saes.hooks: give at least one hook"),
    (["saes.hooks=[a, a]"], r"saes.hooks: each hook at most once"),
    (["saes.activation=topk"], r"saes.activation='topk': k is required for activation 'topk'"),
    (["saes.k=4"], r"saes.activation='relu': " + re.escape(f"k is only for the activations {list(activations_with('k'))}")),
    (["saes.activation=topk", "saes.k=100000", "saes.n_latents=2048"], r"k must be in \[1, n_latents=2048\]"),
    (["saes.activation=jumprelu", "saes.params={band: 1}"], r"has no hyperparameter 'band'; its hyperparameters: "
                                                          r"bandwidth, init_threshold"),
    (["saes.activation=jumprelu", "loss.sparsity_p=0.5"], r"loss.sparsity_p=0.5 does not apply to "
                                                         r"saes.activation='jumprelu'"),
    (["saes.n_latents=null", "saes.ratio=null"], r"saes.n_latents or saes.ratio"),
    (["loss.downstream_coeff=1"], r"loss.downstream_hooks: give the later hook points"),
    (["loss.downstream_coeff=1", "loss.downstream_hooks=[a, b]", "loss.downstream_coeffs=[1]"],
     r"one value per downstream hook \(2\), got 1"),
    (["loss.kl_coeff=0"], r"no reconstruction term"),
    (["optim.grad_accum=3"], r"optim.grad_accum=3 must divide optim.batch_size=16"),
    (["optim.betas=[0.9]"], r"optim.betas must be two numbers"),
    (["device=tpu"], r"device must be 'auto', 'cpu' or 'cuda"),
    (["loss.sparsity_p=0"], r"loss.sparsity_p must be in \(0, 2\]"),
    (["novalue"], r"expected key=value"),
    (["data.path=corpus.txt"], r"data.path is not used by data.kind='embedded'; its keys: prepend_bos"),
    (["data.kind=text"], r"data.path is required for data.kind='text'"),
    (["data.kind=hf"], r"data.name \(the dataset\) is required"),
    (["data.kind=text", "data.path=x", "data.dtype=uint16"], r"data.dtype is not used by data.kind='text'; its keys: column, eval_fraction, path, prepend_bos"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("embedded", overrides)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_apply_overrides_creates_sections():
    assert apply_overrides({}, ["a.b.c=[1, 2]", "a.d=x"]) == {"a": {"b": {"c": [1, 2]}, "d": "x"}}


def test_example_config_in_repo_root_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    examples = sorted(root.glob("*.yaml"))
    assert examples, "configs/ should hold at least one example config"
    for path in examples:
        load_config(path)
        assert yaml.safe_load(path.read_text())
