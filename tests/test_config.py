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
    (["data.source=csv"], r"data.source='csv' is not allowed; allowed values: 'embedded', 'hf', 'text', 'tokens'"),
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
    (["data.path=corpus.txt"], r"data.path is not used by data.source='embedded'; its keys: prepend_bos"),
    (["data.source=text"], r"data.path is required for data.source='text'"),
    (["data.source=hf"], r"data.name \(the dataset\) is required"),
    (["data.source=text", "data.path=x", "data.dtype=uint16"], r"data.dtype is not used by data.source='text'; its keys: column, eval_fraction, path, prepend_bos"),
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


def test_data_kind_is_read_as_data_source_with_a_deprecation_warning(tmp_path):
    old = {"data": {"kind": "text", "path": "corpus.txt"}}
    with pytest.warns(DeprecationWarning, match=r"data\.kind .*now data\.source"):
        config = load_config(old)
    assert config.data.source == "text" and "kind" not in config.to_dict()["data"]
    assert old == {"data": {"kind": "text", "path": "corpus.txt"}}  # the caller's dict is left as it was
    with pytest.warns(DeprecationWarning, match=r"data\.source"):
        assert TrainConfig.from_dict(old).data.source == "text"
    with pytest.warns(DeprecationWarning, match=r"--set data\.source"):
        assert load_config("embedded", ["data.kind=text", "data.path=x"]).data.source == "text"
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  kind: text\n  path: corpus.txt\n")
    with pytest.warns(DeprecationWarning, match=r"data\.source"):
        assert load_config(path).data.source == "text"
    # a --set of the new name overrides a file's old one (a dashboard or eval of an old run on other data)
    with pytest.warns(DeprecationWarning):
        assert load_config(path, ["data.source=embedded", "data.path=null"]).data.source == "embedded"
    # the same value under both names is read; different values are an error naming both
    with pytest.warns(DeprecationWarning):
        assert load_config({"data": {"kind": "text", "source": "text", "path": "x"}}).data.source == "text"
    with pytest.raises(ConfigError, match=r"data\.kind='hf' and data\.source='text'"):
        load_config({"data": {"kind": "hf", "source": "text", "path": "x"}})


def test_a_run_saved_with_data_kind_resumes(tmp_path):
    """Run directories store the config as it was written (config.yaml, and the checkpoint's
    "config"): one from before the rename loads through the path --resume and eval take."""
    from fastsae.train.checkpoint import CONFIG_FILE, load_run_config, record_overrides

    saved = TrainConfig().to_dict()
    saved["data"] = {"kind" if key == "source" else key: value for key, value in saved["data"].items()}
    saved["data"].update(kind="text", path="corpus.txt")
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    record_overrides(tmp_path, ["data.kind=tokens", "data.dtype=uint16"], step=5)  # an earlier resume's --set
    with pytest.warns(DeprecationWarning, match=r"data\.source"):
        config = load_run_config(tmp_path, ["optim.lr=1e-4"])
    assert (config.data.source, config.data.path, config.data.dtype, config.optim.lr) == (
        "tokens", "corpus.txt", "uint16", 1e-4)
    with pytest.warns(DeprecationWarning, match=r"data\.source"):
        assert TrainConfig.from_dict(saved).data.source == "text"
