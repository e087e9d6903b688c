"""SAE file formats (fastsae.formats): fastsae, SAELens, sparsify and e2e_sae, in and out.

Every format is written from a model built in the test and read back by fastsae; the other tools'
formats are also checked against those tools' own code when it is installed (sae-lens,
eai-sparsify: CI's second leg installs them, with SPARSIFY_DISABLE_TRITON=1; elsewhere those tests
skip). SAELens's forward pass is also reimplemented here from its source, so the SAELens layout is
checked in every leg. Exact means relative error 1e-5 on the reconstruction and the same code.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

import fastsae
from fastsae import E2ESAE, formats
from fastsae.activations import ACTIVATIONS
from fastsae.sae import SparseCode

D, N, K = 16, 48, 4
HOOK = "blocks.1.hook_resid_pre"
CASES = [("relu", "forward"), ("relu", "project"), ("topk", "forward"), ("topk", "project")]
# transcoders: the MLP's input (sparsify's layers.1.mlp reads it) -> its output; the presets read
# TransformerLens's hook_normalized instead (the norm's output before its weight and bias)
TC_HOOK = "blocks.1.mlp.hook_in->blocks.1.hook_mlp_out"
TC_NORMALIZED = "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out"
D_OUT = 24


def relu_writes_d_out() -> bool:
    """Whether the ReLU / JumpReLU fused op (fastsae.ops.relu_autoencode) takes W_dec [n, d_out]
    with d_out != d_in; where it does not, the ReLU and JumpReLU transcoders here write d_in."""
    from fastsae.ops import relu_autoencode

    try:
        relu_autoencode(torch.zeros(2, 4), torch.zeros(4, 3), torch.zeros(3), torch.zeros(3, 5), torch.zeros(5))
    except ValueError:
        return False
    return True


RELU_D_OUT = D_OUT if relu_writes_d_out() else D


def make_sae(activation="relu", decoder_norm="forward", seed=0, d=D, n=N, hook=HOOK):
    """An SAE with every parameter non-trivial: biases set, and in "forward" mode decoder rows of
    unequal norms (so a conversion that drops the forward-pass normalisation would show)."""
    torch.manual_seed(seed)
    sae = E2ESAE(d, n, activation, K if activation == "topk" else None, decoder_norm=decoder_norm,
                 metadata={"hook": hook, "model": "tiny-model", "run": "test"})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 1.0)
        if decoder_norm == "forward":
            sae.W_dec.mul_(torch.rand(n, 1) * 2 + 0.1)
    return sae


def inputs(seed=1, d=D):
    return torch.randn(3, 5, d, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dense_code(sae, x):
    code = sae.encode(x)
    return code.to_dense(sae.n_latents) if isinstance(code, SparseCode) else code


def assert_same_function(loaded, original, x):
    assert (loaded.activation, loaded.k, loaded.d_in, loaded.n_latents) == \
        (original.activation, original.k, original.d_in, original.n_latents)
    assert rel_err(loaded(x), original(x)) < 1e-5
    assert rel_err(dense_code(loaded, x), dense_code(original, x)) < 1e-5


# --------------------------------------------------------------------------------------------
# SAELens's forward pass, reimplemented from its source

def saelens_forward(path, x):
    """SAELens 6.x StandardSAE / TopKSAE.forward for a directory (sae_lens/saes/*.py)."""
    cfg = json.loads((path / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(str(path / "sae_weights.safetensors")).items()}
    x = x.double()
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        return F.relu(hidden_pre) @ w["W_dec"] + w["b_dec"]
    norms = w["W_dec"].norm(dim=-1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden_pre = hidden_pre * norms
    values, indices = hidden_pre.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())
    if cfg.get("rescale_acts_by_decoder_norm"):
        acts = acts / norms
    return acts @ w["W_dec"] + w["b_dec"]


class E2eSaeSAE(nn.Module):
    """e2e_sae/models/sparsifiers.py's SAE: the module tree (and so the state-dict keys) it saves."""

    def __init__(self, input_size, n_dict_components):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_size, n_dict_components, bias=True), nn.ReLU())
        self.decoder = nn.Linear(n_dict_components, input_size, bias=True)
        self.decoder.weight.data = nn.init.orthogonal_(self.decoder.weight.data.T).T

    def forward(self, x):
        c = self.encoder(x)
        return F.linear(c, F.normalize(self.decoder.weight, dim=0), bias=self.decoder.bias), c


def write_e2e_sae_run(directory, hooks, samples=(200, 400), d=D, ratio=3):
    """What e2e_sae's run_train_tlens_saes.py leaves: final_config.yaml (yaml.dump of its Config)
    and samples_<N>.pt = torch.save(SAETransformer.saes.state_dict()) at each save."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"seed": 0, "tlens_model_name": "gpt2", "tlens_model_path": None, "batch_size": 8, "lr": 5e-4,
              "saes": {"type_of_sparsifier": "sae", "dict_size_to_input_ratio": ratio, "k": None,
                       "pretrained_sae_paths": None, "retrain_saes": False, "sae_positions": hooks}}
    (directory / "final_config.yaml").write_text(yaml.dump(config))
    saes = None
    for step in samples:
        saes = nn.ModuleDict({hook.replace(".", "-"): E2eSaeSAE(d, ratio * d) for hook in hooks})
        with torch.no_grad():
            for sae in saes.values():
                sae.decoder.weight.mul_(torch.rand(1, ratio * d) + 0.5)  # un-normalised columns
        torch.save(saes.state_dict(), directory / f"samples_{step}.pt")
    return saes  # those of the latest file


# --------------------------------------------------------------------------------------------
# round trips and the other tools' forward passes

def test_fastsae_round_trip_is_bit_exact(tmp_path):
    sae = make_sae("topk", "forward")
    sae.save_pretrained(tmp_path / "sae")
    loaded = E2ESAE.from_pretrained(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert loaded.decoder_norm == "forward" and loaded.metadata == sae.metadata


@pytest.mark.parametrize("activation,decoder_norm", CASES)
def test_saelens_export_round_trip(tmp_path, activation, decoder_norm):
    sae, x = make_sae(activation, decoder_norm), inputs()
    sae.save_pretrained(tmp_path / "sl", format="saelens")
    assert rel_err(saelens_forward(tmp_path / "sl", x), sae(x)) < 1e-5
    loaded = E2ESAE.from_pretrained(tmp_path / "sl")
    assert_same_function(loaded, sae, x)
    assert loaded.decoder_norm == decoder_norm and loaded.metadata == sae.metadata  # restored
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny-model"
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_sae"] == N


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
def test_sparsify_export_round_trip(tmp_path, decoder_norm):
    sae, x = make_sae("topk", decoder_norm), inputs()
    sae.save_pretrained(tmp_path / "sp", format="sparsify")  # against sparsify's code: test_against_sparsify
    loaded = E2ESAE.from_pretrained(tmp_path / "sp")
    assert_same_function(loaded, sae, x)
    assert loaded.decoder_norm == decoder_norm and loaded.metadata == sae.metadata


def write_saelens_dir(path, architecture, *, apply_b_dec_to_input=True, rescale=False, seed=3, d=D, **extra):
    """A SAELens directory as SAE.save_model writes it, with non-unit decoder rows."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(d, N, generator=g) / 4, "b_enc": torch.randn(N, generator=g) / 4,
               "W_dec": torch.randn(N, d, generator=g) / 4, "b_dec": torch.randn(d, generator=g)}
    cfg = {"d_in": d, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": architecture,
           "metadata": {"sae_lens_version": "6.54.0", "hook_name": HOOK, "model_name": "gpt2"}, **extra}
    if architecture == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=rescale)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("architecture,apply_b_dec,rescale", [
    ("standard", True, False), ("standard", False, False), ("topk", True, False), ("topk", True, True)])
def test_saelens_import_matches_its_forward(tmp_path, architecture, apply_b_dec, rescale):
    path = write_saelens_dir(tmp_path / "sl", architecture, apply_b_dec_to_input=apply_b_dec, rescale=rescale)
    x = inputs()
    sae = E2ESAE.from_pretrained(path, hook=HOOK)
    assert sae.activation == {"standard": "relu", "topk": "topk"}[architecture]
    assert sae.decoder_norm == "project" and sae.metadata["hook"] == HOOK and sae.metadata["model"] == "gpt2"
    assert rel_err(sae(x), saelens_forward(path, x)) < 1e-5


def test_saelens_5_topk_config_loads_as_topk(tmp_path):
    """SAELens before 6.0: TopK SAEs as architecture "standard" with activation_fn_str "topk", k in
    activation_fn_kwargs, hook_name / model_name at the top level."""
    path = write_saelens_dir(tmp_path / "sl5", "standard", activation_fn_str="topk", activation_fn_kwargs={"k": K},
                             hook_name=HOOK, model_name="gpt2", metadata={})
    sae = E2ESAE.from_pretrained(path)
    assert (sae.activation, sae.k, sae.metadata["hook"], sae.metadata["model"]) == ("topk", K, HOOK, "gpt2")
    config = json.loads((path / "cfg.json").read_text())
    config["activation_fn_str"] = "tanh-relu"
    (path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation_fn 'tanh-relu' is not supported"):
        E2ESAE.from_pretrained(path)


def test_saelens_3_config_names_its_hook_as_hook_point(tmp_path):
    """Files written before SAELens 6 (the e2e paper's SAEs on Neuronpedia among them): the hook at the
    top level, as hook_point before 3.0, and normalize_activations a bool (false: none)."""
    path = write_saelens_dir(tmp_path / "sl3", "standard", hook_point=HOOK, model_name="gpt2",
                             normalize_activations=False, metadata={})
    sae = E2ESAE.from_pretrained(path)
    assert (sae.metadata["hook"], sae.metadata["model"]) == (HOOK, "gpt2")
    assert formats.load_all(tmp_path)[HOOK].spec.activation == "relu"  # read_hook finds it too
    config = json.loads((path / "cfg.json").read_text())
    config["normalize_activations"] = True  # SAELens read true as expected_average_only_in
    (path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="normalize_activations=True rescales"):
        E2ESAE.from_pretrained(path)


def test_a_directory_saved_again_loads_its_latest_format(tmp_path):
    old, new = make_sae("topk", "project", seed=1), make_sae("topk", "project", seed=2)
    old.save_pretrained(tmp_path / "sae", format="sparsify")  # leaves sae.safetensors behind
    new.save_pretrained(tmp_path / "sae")
    loaded = E2ESAE.from_pretrained(tmp_path / "sae")
    assert torch.equal(loaded.W_dec, new.W_dec)


def test_sparsify_run_dir_maps_hookpoints(tmp_path):
    saes = {hook: make_sae("topk", "project", seed=i, hook=hook)
            for i, hook in enumerate(["blocks.1.hook_resid_pre", "blocks.3.hook_resid_pre"])}
    written = formats.export(None, "sparsify", tmp_path / "run", records={h: s.to_record() for h, s in saes.items()})
    assert {p.name for p in written.values()} == {"layers.0", "layers.2"}
    with pytest.raises(ValueError, match=r"holds 2 SAEs.*blocks\.1\.hook_resid_pre.*blocks\.3\.hook_resid_pre"):
        E2ESAE.from_pretrained(tmp_path / "run")
    x = inputs()
    for name in ("blocks.3.hook_resid_pre", "blocks.2.hook_resid_post", "layers.2"):  # one residual, three names
        loaded = E2ESAE.from_pretrained(tmp_path / "run", hook=name)
        assert rel_err(loaded(x), saes["blocks.3.hook_resid_pre"](x)) < 1e-5
    assert sorted(fastsae.load_run(tmp_path / "run")) == sorted(saes)
    with pytest.raises(ValueError, match="no SAE for hook 'blocks.2.hook_resid_pre'"):
        E2ESAE.from_pretrained(tmp_path / "run", hook="blocks.2.hook_resid_pre")


def test_sparsify_hookpoint_names():
    assert formats.sparsify_hookpoint("blocks.6.hook_resid_pre") == "layers.5"
    assert formats.sparsify_hookpoint("blocks.6.hook_resid_post", "h") == "h.6"
    assert formats.hook_from_sparsify("gpt_neox.layers.5") == "blocks.6.hook_resid_pre"
    assert formats.hook_from_sparsify("layers.5.mlp") == "blocks.5.hook_mlp_out"  # an SAE reads its output
    assert formats.hook_from_sparsify("layers.5.self_attn") is None
    with pytest.raises(ValueError, match="embedding output"):
        formats.sparsify_hookpoint("blocks.0.hook_resid_pre")
    assert formats.sparsify_hookpoint("blocks.2.hook_mlp_out", "h") == "h.2.mlp"
    with pytest.raises(ValueError, match="'blocks.2.hook_attn_out' has no sparsify hookpoint"):
        formats.sparsify_hookpoint("blocks.2.hook_attn_out")


def test_sparsify_transcoder_hookpoint_names():
    """A sparsify transcoder reads its module's input and writes its output: the MLP's input is
    blocks.L.mlp.hook_in (= blocks.L.ln2.hook_out), not TransformerLens's pre-affine hook_normalized."""
    assert formats.hook_from_sparsify("h.3.mlp", transcode=True) == "blocks.3.mlp.hook_in->blocks.3.hook_mlp_out"
    assert formats.hook_from_sparsify("layers.3", transcode=True) == "blocks.3.hook_resid_pre->blocks.3.hook_resid_post"
    for hook in ("blocks.3.mlp.hook_in->blocks.3.hook_mlp_out", "blocks.3.ln2.hook_out->blocks.3.mlp.hook_out"):
        assert formats.sparsify_hookpoint(hook, "h") == "h.3.mlp"
    assert formats.sparsify_hookpoint("blocks.3.hook_resid_pre->blocks.4.hook_resid_pre") == "layers.3"
    with pytest.raises(ValueError, match=r"ln2.hook_normalized is the LayerNorm's output before its weight and bias"):
        formats.sparsify_hookpoint(TC_NORMALIZED)
    with pytest.raises(ValueError, match="has no sparsify hookpoint: sparsify's transcoders read a module's input"):
        formats.sparsify_hookpoint("blocks.1.mlp.hook_in->blocks.2.hook_mlp_out")  # two layers' MLPs
    assert "blocks.3.ln2.hook_out->blocks.3.mlp.hook_out" in formats.hooks.hook_aliases(
        "blocks.3.mlp.hook_in->blocks.3.hook_mlp_out")


# --------------------------------------------------------------------------------------------
# e2e_sae checkpoints

def test_e2e_sae_checkpoint_matches_its_forward(tmp_path):
    hooks = ["blocks.2.hook_resid_pre", "blocks.4.hook_resid_pre"]
    reference = write_e2e_sae_run(tmp_path / "run", hooks)
    x = inputs()
    with pytest.raises(ValueError, match=r"holds 2 SAEs; choose one with hook=.*blocks\.2\.hook_resid_pre"):
        E2ESAE.from_pretrained(tmp_path / "run")
    for hook in hooks:
        expected, expected_code = reference[hook.replace(".", "-")](x)
        for path in (tmp_path / "run", tmp_path / "run" / "samples_400.pt"):  # the latest file, or that file
            sae = E2ESAE.from_pretrained(path, hook=hook)
            assert (sae.activation, sae.decoder_norm) == ("relu", "forward")
            assert sae.metadata["hook"] == hook and sae.metadata["model"] == "gpt2"
            assert rel_err(sae(x), expected.detach()) < 1e-5
            assert rel_err(sae.encode(x), expected_code.detach()) < 1e-5
    older = E2ESAE.from_pretrained(tmp_path / "run" / "samples_200.pt", hook=hooks[0])
    assert rel_err(older(x), reference[hooks[0].replace(".", "-")](x)[0].detach()) > 1e-2
    assert sorted(fastsae.load_run(tmp_path / "run")) == hooks


def test_e2e_sae_foreign_keys_are_refused(tmp_path):
    tmp_path.joinpath("run").mkdir()
    torch.save({"blocks-2-hook_resid_pre.codebook": torch.zeros(3, D)}, tmp_path / "run" / "samples_10.pt")
    with pytest.raises(ValueError, match="unexpected key 'blocks-2-hook_resid_pre.codebook'"):
        E2ESAE.from_pretrained(tmp_path / "run")


# --------------------------------------------------------------------------------------------
# runs, export, the trainer

def test_run_dir_checkpoint_and_export(tmp_path, capsys):
    from fastsae.cli import main
    from fastsae.train import checkpoint as ckpt

    saes = {hook: make_sae("topk", "forward", seed=i, hook=hook)
            for i, hook in enumerate(["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"])}
    old = {hook: make_sae("topk", "forward", seed=10 + i, hook=hook) for i, hook in enumerate(saes)}
    ckpt.save_checkpoint(tmp_path / "run", 5, old, {"step": 5}, keep=2)
    step = ckpt.save_checkpoint(tmp_path / "run", 10, saes, {"step": 10}, keep=2)
    x = inputs()
    for path in (tmp_path / "run", step):
        loaded = fastsae.load_run(path)
        assert sorted(loaded) == sorted(saes)
        for hook, sae in saes.items():
            assert rel_err(loaded[hook](x), sae(x)) == 0
            assert rel_err(E2ESAE.from_pretrained(path, hook=hook)(x), sae(x)) == 0
    for fmt, names in (("saelens", sorted(saes)), ("sparsify", ["layers.0", "layers.1"])):
        assert main(["export", str(tmp_path / "run"), "--format", fmt]) == 0
        out = tmp_path / "run" / f"export-{fmt}"
        assert sorted(p.name for p in out.iterdir()) == names
        for hook, sae in saes.items():
            assert_same_function(E2ESAE.from_pretrained(out, hook=hook), sae, x)
    assert main(["export", str(tmp_path / "run"), "--format", "sparsify", "--out", str(tmp_path / "x")]) == 0
    relu = {HOOK: make_sae("relu")}
    ckpt.save_checkpoint(tmp_path / "relu_run", 1, relu, {"step": 1})
    assert main(["export", str(tmp_path / "relu_run"), "--format", "sparsify"]) == 2
    assert "sparsify stores TopK SAEs only" in capsys.readouterr().err


def test_trainer_accepts_sae_paths(tmp_path):
    from fastsae.model.lm import LanguageModel
    from fastsae.train import Trainer, load_config
    from helpers_models import save_tiny_gpt2

    model_dir = save_tiny_gpt2(tmp_path / "model", n_layer=2, n_embd=D, n_head=2, n_ctx=32)
    lm = LanguageModel.load(str(model_dir))
    path = write_saelens_dir(tmp_path / "released", "topk")
    config = load_config({}, [f"model.name={model_dir}", f"saes.hooks=[{HOOK}]", "log.progress=false",
                              f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(config, model=lm, saes={HOOK: str(path)})
    x = inputs()
    assert rel_err(trainer.saes[HOOK](x), saelens_forward(path, x)) < 1e-5
    wide = write_saelens_dir(tmp_path / "wide", "standard", d=2 * D)
    with pytest.raises(ValueError, match=f"saes\\['{HOOK}'\\] reads d_in={2 * D} but the model's d_model is {D}"):
        Trainer(config, model=lm, saes={HOOK: wide})


def test_cli_eval_of_a_released_sae(tmp_path, capsys):
    from fastsae.cli import main
    from helpers_models import save_tiny_gpt2

    model_dir = save_tiny_gpt2(tmp_path / "model", n_layer=2, n_embd=D, n_head=2, n_ctx=32)
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 250, 4096).astype(np.uint16).tofile(tokens)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.dump({"data": {"source": "tokens", "path": str(tokens), "dtype": "uint16",
                                         "context_length": 16},
                                 "eval": {"n_tokens": 64, "batch_size": 2}, "log": {"progress": False}}))
    make_sae("relu", "forward", hook="blocks.9.hook_resid_pre").save_pretrained(tmp_path / "sl", format="saelens")
    argv = ["eval", "--sae", f"{tmp_path / 'sl'}@{HOOK}", "--model", str(model_dir), "--config", str(config),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2  # the file says blocks.9: a different hook is refused
    assert "no SAE for hook" in capsys.readouterr().err
    make_sae("relu", "forward").save_pretrained(tmp_path / "sl2", format="saelens")
    argv[2] = str(tmp_path / "sl2")  # the hook from its metadata, the model from --model
    assert main(argv) == 0
    assert "eval of" in capsys.readouterr().out
    assert (tmp_path / "out" / "eval.json").is_file()
    # without --out nothing is written, not even into a run_dir the config names (another run's)
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    assert main(argv[:-2] + ["--set", f"run_dir={other_run}"]) == 0
    assert not (other_run / "eval.json").exists()


# --------------------------------------------------------------------------------------------
# what must not load, or not load silently wrong

@pytest.mark.parametrize("architecture", ["gated", "temporal", "matching_pursuit"])
def test_saelens_other_architectures_are_refused(tmp_path, architecture):
    path = write_saelens_dir(tmp_path / "sl", "standard")
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "architecture": architecture}))
    with pytest.raises(ValueError, match=f"SAELens architecture '{architecture}' is not supported"):
        E2ESAE.from_pretrained(path)


def test_saelens_activation_normalisation_is_refused(tmp_path):
    path = write_saelens_dir(tmp_path / "sl", "standard", normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in'"):
        E2ESAE.from_pretrained(path)


def test_wrong_shapes_are_refused(tmp_path):
    path = write_saelens_dir(tmp_path / "sl", "standard")
    tensors = load_file(str(path / "sae_weights.safetensors"))
    tensors["W_dec"] = tensors["W_dec"][:-1]
    save_file(tensors, str(path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"W_dec has shape \(47, 16\), expected \(48, 16\)"):
        E2ESAE.from_pretrained(path)
    make_sae("topk", "project").save_pretrained(tmp_path / "sp", format="sparsify")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({**cfg, "d_in": D + 1}))
    with pytest.raises(ValueError, match="d_in=17 but encoder.weight has shape"):
        E2ESAE.from_pretrained(tmp_path / "sp")


def test_sparsify_refuses_relu_and_reads_only_plain_sparse_coders(tmp_path):
    with pytest.raises(ValueError, match="sparsify stores TopK SAEs only"):
        make_sae("relu").save_pretrained(tmp_path / "sp", format="sparsify")
    make_sae("topk", "project").save_pretrained(tmp_path / "sp", format="sparsify")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(ValueError, match="activation='groupmax'; fastsae loads sparsify's TopK SAEs only"):
        E2ESAE.from_pretrained(tmp_path / "sp")


def test_missing_hook_and_unknown_paths(tmp_path):
    make_sae().save_pretrained(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"no SAE for hook 'blocks.5.hook_resid_pre'; it holds SAEs for \['blocks.1"):
        E2ESAE.from_pretrained(tmp_path / "sae", hook="blocks.5.hook_resid_pre")
    assert E2ESAE.from_pretrained(tmp_path / "sae", hook="blocks.0.hook_resid_post").d_in == D  # the same residual
    with pytest.raises(FileNotFoundError, match="no SAE directory or file"):
        E2ESAE.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no cfg.json and holds no SAE"):
        E2ESAE.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="format must be one of"):
        make_sae().save_pretrained(tmp_path / "x", format="onnx")


def test_fastsae_config_cannot_pass_for_saelens(tmp_path):
    """The trap: renaming n_latents to d_sae in a fastsae cfg.json. SAELens reads `architecture`
    (absent: "standard", a ReLU SAE that subtracts b_dec); ours names none of its architectures."""
    make_sae("topk", "forward").save_pretrained(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert not any(kind.reads_saelens(cfg) for kind in ACTIVATIONS.values())
    assert "format='saelens'" in cfg["architecture"]
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    cfg["d_sae"] = cfg.pop("n_latents")
    del cfg["format"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fastsae config edited to look like SAELens's"):
        E2ESAE.from_pretrained(tmp_path / "sae")


# --------------------------------------------------------------------------------------------
# transcoders (d_out, a skip path W_skip, metadata hook "IN->OUT")

def make_transcoder(activation, d_out=D, skip=False, decoder_norm="forward", seed=0, hook=TC_HOOK):
    """A transcoder in eval mode with every parameter non-trivial (W_skip too, decoder rows of unequal
    norms in "forward" mode) and thresholds that gate part of the code."""
    params = {"relu": {}, "jumprelu": {}, "topk": {"k": K}, "batchtopk": {"k": K}}[activation]
    torch.manual_seed(seed)
    sae = E2ESAE(D, N, activation, decoder_norm=decoder_norm, d_out=d_out, skip=skip,
                 metadata={"hook": hook, "model": "tiny-model"}, **params).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 1.0)
        if decoder_norm == "forward":
            sae.W_dec.mul_(torch.rand(N, 1) * 2 + 0.1)
        if skip:
            sae.W_skip.normal_(0, 0.3)
        if activation == "jumprelu":
            sae.log_threshold.copy_(torch.rand(N).mul(0.4).add(0.05).log())
        elif activation == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


def saelens_transcoder_forward(path, x):
    """SAELens 6.x Transcoder / SkipTranscoder / JumpReLUTranscoder / JumpReLUSkipTranscoder.forward
    for a directory (sae_lens/saes/transcoder.py): no b_dec on the input, W_skip [d_out, d_in]."""
    cfg = json.loads((path / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(str(path / "sae_weights.safetensors")).items()}
    x = x.double()
    hidden_pre = x @ w["W_enc"] + w["b_enc"]
    acts = F.relu(hidden_pre)
    if cfg["architecture"].startswith("jumprelu"):
        acts = acts * (hidden_pre > w["threshold"])
    out = acts @ w["W_dec"] + w["b_dec"]
    if cfg["architecture"].endswith("skip_transcoder"):
        out = out + x @ w["W_skip"].T
    return out


def sparsify_forward(path, x):
    """sparsify 1.3 SparseCoder.forward's sae_out for a directory (sparsify/sparse_coder.py): an SAE
    encodes x - b_dec, a transcoder x; skip_connection adds x @ W_skip.mT."""
    cfg = json.loads((path / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(str(path / "sae.safetensors")).items()}
    x = x.double()
    pre = F.relu((x if cfg["transcode"] else x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    values, indices = pre.topk(cfg["k"], dim=-1)
    out = torch.zeros_like(pre).scatter(-1, indices, values) @ w["W_dec"] + w["b_dec"]
    if cfg["skip_connection"]:
        out = out + x @ w["W_skip"].T
    return out


SAELENS_ARCHITECTURE = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder"}
# (activation, d_out, skip): BatchTopK writes d_out != d_in (as SAELens's JumpReLU transcoders), ReLU
# and JumpReLU where their fused op does
SAELENS_TC_CASES = [("relu", RELU_D_OUT, False), ("relu", D, True), ("jumprelu", D, False),
                    ("jumprelu", RELU_D_OUT, True), ("batchtopk", D_OUT, False), ("batchtopk", D_OUT, True)]
TC_CASES = ([("fastsae", "topk", D_OUT, True), ("fastsae", "relu", RELU_D_OUT, True)]
            + [("saelens", *case) for case in SAELENS_TC_CASES]
            + [("sparsify", "topk", D, False), ("sparsify", "topk", D, True)])


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
@pytest.mark.parametrize("fmt,activation,d_out,skip", TC_CASES)
def test_transcoder_round_trip(tmp_path, fmt, activation, d_out, skip, decoder_norm):
    tc, x = make_transcoder(activation, d_out, skip, decoder_norm), inputs()
    tc.save_pretrained(tmp_path / "tc", format=fmt)
    loaded = E2ESAE.from_pretrained(tmp_path / "tc").eval()
    assert loaded.spec == tc.spec and loaded.metadata == tc.metadata  # d_out, skip and the hooks restored
    assert (loaded.hook_in, loaded.hook_out) == ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
    assert rel_err(loaded(x), tc(x)) < 1e-5
    assert rel_err(dense_code(loaded, x), dense_code(tc, x)) < 1e-5
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    if fmt == "fastsae":
        for name in tc.tensor_names():
            assert torch.equal(getattr(loaded, name), getattr(tc, name)), name
    elif fmt == "saelens":
        assert cfg["architecture"] == SAELENS_ARCHITECTURE[activation].replace("transcoder", "skip_transcoder" if skip
                                                                                else "transcoder")
        assert (cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (D, d_out, False)
        assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == ("blocks.1.mlp.hook_in",
                                                                                    "blocks.1.hook_mlp_out")
        if skip:
            assert load_file(str(tmp_path / "tc" / "sae_weights.safetensors"))["W_skip"].shape == (d_out, D)
        assert rel_err(saelens_transcoder_forward(tmp_path / "tc", x), tc(x)) < 1e-5
    else:
        assert (cfg["transcode"], cfg["skip_connection"], cfg["d_in"]) == (True, skip, D)
        assert rel_err(sparsify_forward(tmp_path / "tc", x), tc(x)) < 1e-5


def test_sparsify_skip_sae_round_trip(tmp_path):
    """sparsify's skip_connection on an SAE (transcode false: it encodes x - b_dec): a fastsae SAE with
    a skip path and one hook, both ways."""
    sae, x = make_transcoder("topk", D, True, hook=HOOK), inputs()
    sae.save_pretrained(tmp_path / "sp", format="sparsify")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert (cfg["transcode"], cfg["skip_connection"]) == (False, True)
    assert rel_err(sparsify_forward(tmp_path / "sp", x), sae(x)) < 1e-5
    loaded = E2ESAE.from_pretrained(tmp_path / "sp")
    assert loaded.spec == sae.spec and rel_err(loaded(x), sae(x)) < 1e-5


def write_saelens_transcoder_dir(path, architecture, d_out, seed=3, **extra):
    """A SAELens transcoder directory as its save_model writes it (sae_lens/saes/transcoder.py)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(D, N, generator=g) / 4, "b_enc": torch.randn(N, generator=g) / 4,
               "W_dec": torch.randn(N, d_out, generator=g) / 4, "b_dec": torch.randn(d_out, generator=g)}
    if architecture.startswith("jumprelu"):
        tensors["threshold"] = torch.rand(N, generator=g) * 0.3
    if "skip" in architecture:
        tensors["W_skip"] = torch.randn(d_out, D, generator=g) / 4
    cfg = {"architecture": architecture, "d_in": D, "d_sae": N, "d_out": d_out, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.0", "hook_name": "blocks.1.ln2.hook_normalized",
                        "hook_name_out": "blocks.1.hook_mlp_out", "model_name": "gpt2"}, **extra}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder", "jumprelu_transcoder",
                                          "jumprelu_skip_transcoder"])
def test_saelens_transcoder_import_matches_its_forward(tmp_path, architecture):
    path = write_saelens_transcoder_dir(tmp_path / "sl", architecture, RELU_D_OUT)
    x = inputs()
    tc = E2ESAE.from_pretrained(path)
    assert tc.activation == ("jumprelu" if architecture.startswith("jumprelu") else "relu")
    assert (tc.d_out, tc.skip, tc.decoder_norm) == (RELU_D_OUT, "skip" in architecture, "project")
    assert tc.metadata["hook"] == TC_NORMALIZED and tc.metadata["model"] == "gpt2"
    assert rel_err(tc(x), saelens_transcoder_forward(path, x)) < 1e-5
    assert list(formats.load_all(tmp_path)) == [TC_NORMALIZED]


def test_transcoder_refusals(tmp_path):
    with pytest.raises(ValueError, match="SAELens has no 'topk' transcoder.*format='sparsify'"):
        make_transcoder("topk", D, True).save_pretrained(tmp_path / "a", format="saelens")
    with pytest.raises(ValueError, match="this transcoder reads d_in=16 and writes d_out=24"):
        make_transcoder("topk", D_OUT).save_pretrained(tmp_path / "b", format="sparsify")
    with pytest.raises(ValueError, match="hook_normalized is the LayerNorm's output before its weight and bias"):
        make_transcoder("topk", hook=TC_NORMALIZED).save_pretrained(tmp_path / "c", format="sparsify")
    with pytest.raises(ValueError, match="format must be one of"):  # e2e_sae is read only (it has no transcoders)
        formats.save(make_transcoder("relu").to_record(), tmp_path / "d", "e2e_sae")
    both = {TC_HOOK: make_transcoder("topk").to_record(),
            "blocks.1.hook_mlp_out": make_sae("topk", hook="blocks.1.hook_mlp_out").to_record()}
    with pytest.raises(ValueError, match=r"would all be written to 'layers.1.mlp'"):
        formats.export(None, "sparsify", tmp_path / "e", records=both)
    assert not any((tmp_path / name).exists() for name in "abcde")  # refused before anything is written
    path = write_saelens_transcoder_dir(tmp_path / "sl", "transcoder", D, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="apply_b_dec_to_input=true on a SAELens transcoder"):
        E2ESAE.from_pretrained(path)


def test_fastsae_files_before_transcoders_still_load(tmp_path):
    """cfg.json without d_out and skip (written before transcoders): an SAE, d_out = d_in."""
    sae, x = make_sae("topk", "forward"), inputs()
    sae.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    del cfg["d_out"], cfg["skip"]
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    loaded = E2ESAE.from_pretrained(tmp_path / "old")
    assert (loaded.d_out, loaded.skip, loaded.spec) == (D, False, sae.spec)
    assert rel_err(loaded(x), sae(x)) == 0


def test_transcoder_run_export(tmp_path, capsys):
    """fastsae export and load_run carry a transcoder run through every format that can hold it."""
    from fastsae.cli import main
    from fastsae.train import checkpoint as ckpt

    tc, x = make_transcoder("topk", D, True), inputs()
    ckpt.save_checkpoint(tmp_path / "run", 3, {TC_HOOK: tc}, {"step": 3})
    assert rel_err(fastsae.load_run(tmp_path / "run")[TC_HOOK](x), tc(x)) == 0
    for fmt, name in (("sparsify", "h.1.mlp"), ("fastsae", TC_HOOK)):
        assert main(["export", str(tmp_path / "run"), "--format", fmt, "--layers-name", "h"]) == 0
        out = tmp_path / "run" / f"export-{fmt}"
        assert [p.name for p in out.iterdir()] == [name]
        back = fastsae.load_run(out)
        assert list(back) == [TC_HOOK] and back[TC_HOOK].spec == tc.spec
        assert rel_err(back[TC_HOOK](x), tc(x)) < 1e-5
        alias = E2ESAE.from_pretrained(out, hook="blocks.1.ln2.hook_out->blocks.1.mlp.hook_out")
        assert alias.metadata["hook"] == TC_HOOK
    assert main(["export", str(tmp_path / "run"), "--format", "saelens"]) == 2  # TopK: no SAELens transcoder
    assert "SAELens has no 'topk' transcoder" in capsys.readouterr().err
    # the presets' hook (hook_normalized): SAELens holds a BatchTopK one, sparsify none
    bt = make_transcoder("batchtopk", D_OUT, True, hook=TC_NORMALIZED)
    ckpt.save_checkpoint(tmp_path / "run2", 1, {TC_NORMALIZED: bt}, {"step": 1})
    assert main(["export", str(tmp_path / "run2"), "--format", "saelens"]) == 0
    back = fastsae.load_run(tmp_path / "run2" / "export-saelens")[TC_NORMALIZED].eval()
    assert back.spec == bt.spec and rel_err(back(x), bt(x)) < 1e-5
    assert main(["export", str(tmp_path / "run2"), "--format", "sparsify"]) == 2
    assert "hook_normalized is the LayerNorm's output before its weight and bias" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# against the real libraries (installed in CI's interop leg)

@pytest.mark.parametrize("activation,decoder_norm", CASES)
def test_against_saelens(tmp_path, activation, decoder_norm):
    sae_lens = pytest.importorskip("sae_lens")
    sae, x = make_sae(activation, decoder_norm), inputs()
    sae.save_pretrained(tmp_path / "out", format="saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out"))
    with torch.no_grad():
        assert rel_err(theirs(x), sae(x)) < 1e-5
        assert rel_err(theirs.encode(x), dense_code(sae, x)) < 1e-5
    # and back: a directory SAELens itself wrote (apply_b_dec_to_input true, its own defaults)
    config_cls = sae_lens.StandardSAEConfig if activation == "relu" else sae_lens.TopKSAEConfig
    extra = {"k": K, "rescale_acts_by_decoder_norm": decoder_norm == "forward"} if activation == "topk" else {}
    native = ({"relu": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE}[activation])(
        config_cls(d_in=D, d_sae=N, apply_b_dec_to_input=True, **extra))
    with torch.no_grad():
        for p in native.parameters():
            p.normal_(0, 0.3)
    native.save_model(str(tmp_path / "native"))
    ours = E2ESAE.from_pretrained(tmp_path / "native")
    with torch.no_grad():
        assert rel_err(ours(x), native(x)) < 1e-5
        assert rel_err(dense_code(ours, x), native.encode(x)) < 1e-5
    (tmp_path / "fastsae").mkdir()
    make_sae(activation, decoder_norm).save_pretrained(tmp_path / "fastsae" / "sae")
    cfg = json.loads((tmp_path / "fastsae" / "sae" / "cfg.json").read_text())
    cfg["d_sae"] = cfg.pop("n_latents")  # the trap: SAELens must refuse it, not load it wrong
    (tmp_path / "fastsae" / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="format='saelens'"):
        sae_lens.SAE.load_from_disk(str(tmp_path / "fastsae" / "sae"))


WIDTHS = [8, 24]  # Matryoshka's inner prefixes, of N = 48 latents


def threshold_sae(activation, decoder_norm, seed=0):
    """A JumpReLU, BatchTopK or Matryoshka BatchTopK SAE in eval mode (its inference code: a
    threshold per latent, or one for all), thresholds set so that part of the latents are gated off."""
    params = {"jumprelu": {}, "batchtopk": {"k": K}, "matryoshka_batchtopk": {"k": K, "widths": WIDTHS}}[activation]
    torch.manual_seed(seed)
    sae = E2ESAE(D, N, activation, decoder_norm=decoder_norm, metadata={"hook": HOOK, "model": "tiny-model"},
                 **params).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 1.0)
        if activation == "jumprelu":
            sae.log_threshold.copy_(torch.rand(N).mul(0.4).add(0.05).log())
        else:
            sae.threshold.fill_(0.2)
    return sae


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk", "matryoshka_batchtopk"])
def test_threshold_activations_against_saelens(tmp_path, activation, decoder_norm):
    """JumpReLU, BatchTopK and Matryoshka BatchTopK both ways with SAELens's own classes: our export
    loads with SAE.load_from_disk (as a JumpReLU SAE, which is how SAELens saves BatchTopK and
    Matryoshka BatchTopK for inference) and runs the same function; SAELens's own files (a JumpReLU
    SAE; a BatchTopK or Matryoshka BatchTopK training SAE with its topk_threshold, and its
    matryoshka_widths) load here with the same inference function and the same prefixes."""
    sae_lens = pytest.importorskip("sae_lens")
    sae, x = threshold_sae(activation, decoder_norm), inputs()
    code = dense_code(sae, x)
    assert 0 < (code > 0).float().mean() < 0.9  # the thresholds gate part of the code
    sae.save_pretrained(tmp_path / "out", format="saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out"))
    assert type(theirs).__name__ == "JumpReLUSAE"
    with torch.no_grad():
        assert rel_err(theirs(x), sae(x)) < 1e-5
        assert rel_err(theirs.encode(x), code) < 1e-5
    back = E2ESAE.from_pretrained(tmp_path / "out").eval()
    assert back.spec == sae.spec
    if activation == "jumprelu":
        native = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=True))
        with torch.no_grad():
            for p in native.parameters():
                p.normal_(0, 0.3)
            native.threshold.uniform_(0.0, 0.5)
        native.save_model(str(tmp_path / "native"))
        reference = native
    else:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                            MatryoshkaBatchTopKTrainingSAEConfig)

        if activation == "batchtopk":
            native = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K, apply_b_dec_to_input=True))
        else:  # SAELens lists the whole dictionary as the last width
            native = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D, d_sae=N, k=K, matryoshka_widths=[*WIDTHS, N], apply_b_dec_to_input=True))
        with torch.no_grad():
            for p in native.parameters():
                p.normal_(0, 0.3)
            native.topk_threshold.fill_(0.25)
        native.save_model(str(tmp_path / "native"))
        native.save_inference_model(str(tmp_path / "native-inference"))
        reference = sae_lens.SAE.load_from_disk(str(tmp_path / "native-inference"))
    ours = E2ESAE.from_pretrained(tmp_path / "native").eval()
    assert ours.activation == activation
    if activation == "matryoshka_batchtopk":
        assert ours.spec.params.widths == tuple(WIDTHS) and ours.spec.params.k == K
    with torch.no_grad():
        assert rel_err(ours(x), reference(x)) < 1e-5
        assert rel_err(dense_code(ours, x), reference.encode(x)) < 1e-5


def import_sparsify():
    """sparsify, or a skip where it is not installed. Its sparse decoder is a Triton kernel that
    needs CUDA; SPARSIFY_DISABLE_TRITON=1, read when sparsify is imported, selects its PyTorch one."""
    if "sparsify" not in sys.modules:
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    return pytest.importorskip("sparsify")


def assert_sparsify_runs_like(theirs, sae, x):
    """sparsify's own encode, decode and forward on the exported SAE give fastsae's code and output
    (its decode has no skip path: that is forward's, as in fastsae)."""
    code = sae.encode(x)
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        assert torch.equal(top_indices.sort(-1).values, code.indices.sort(-1).values)
        assert rel_err(top_acts.sort(-1).values, code.values.sort(-1).values) < 1e-5
        assert rel_err(theirs.decode(top_acts, top_indices), sae.decode(code)) < 1e-5
        out = theirs(x)
        assert rel_err(out.sae_out, sae(x)) < 1e-5
        assert torch.equal(out.latent_indices, top_indices)


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
def test_against_sparsify(tmp_path, decoder_norm):
    sparsify = import_sparsify()
    x = inputs().reshape(-1, D)
    # one SAE (E2ESAE.save_pretrained), read by SparseCoder.load_from_disk
    sae = make_sae("topk", decoder_norm)
    sae.save_pretrained(tmp_path / "sp", format="sparsify")
    assert_sparsify_runs_like(sparsify.SparseCoder.load_from_disk(tmp_path / "sp"), sae, x)
    # a run's SAEs (fastsae export), read by SparseCoder.load_many
    saes = {hook: make_sae("topk", decoder_norm, seed=i, hook=hook)
            for i, hook in enumerate(["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"])}
    formats.export(None, "sparsify", tmp_path / "run", records={h: s.to_record() for h, s in saes.items()})
    theirs = sparsify.SparseCoder.load_many(str(tmp_path / "run"), local=True)
    assert sorted(theirs) == ["layers.0", "layers.1"]
    for name, hook in (("layers.0", "blocks.1.hook_resid_pre"), ("layers.1", "blocks.2.hook_resid_pre")):
        assert_sparsify_runs_like(theirs[name], saes[hook], x)
    # and back: an SAE sparsify itself wrote
    native = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K))
    with torch.no_grad():
        native.b_dec.normal_()
        native.encoder.bias.normal_(0, 0.3)
    native.save_to_disk(tmp_path / "native" / "layers.3")
    ours = E2ESAE.from_pretrained(tmp_path / "native")
    assert ours.metadata["hook"] == "blocks.4.hook_resid_pre"
    assert_sparsify_runs_like(native, ours, x)


def test_saelens_runs_our_export_in_its_model(tmp_path):
    """SAELens splices the exported SAE at the hook our metadata names (run_with_saes), and the
    logits equal the model with fastsae's SAE as a plain TransformerLens hook."""
    sae_lens = pytest.importorskip("sae_lens")
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    model = sae_lens.HookedSAETransformer(HookedTransformerConfig(
        n_layers=2, d_model=D, n_ctx=16, d_head=4, n_heads=4, d_vocab=50, act_fn="gelu"))
    tokens = torch.randint(0, 50, (2, 12))
    for activation, decoder_norm in CASES:
        sae = make_sae(activation, decoder_norm)
        sae.save_pretrained(tmp_path / activation / decoder_norm, format="saelens")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / activation / decoder_norm))
        with torch.no_grad():
            expected = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: sae(act))])
            assert rel_err(model.run_with_saes(tokens, saes=[theirs]), expected) < 1e-5
            assert rel_err(expected, model(tokens)) > 1e-3  # the SAE is really in the path


# transcoders against SAELens's and sparsify's own classes

SAELENS_TC_CLASSES = {(False, False): "Transcoder", (False, True): "SkipTranscoder",
                      (True, False): "JumpReLUTranscoder", (True, True): "JumpReLUSkipTranscoder"}


@pytest.mark.parametrize("activation,d_out,skip", SAELENS_TC_CASES)
def test_transcoders_against_saelens(tmp_path, activation, d_out, skip):
    """Our transcoder loads with SAE.load_from_disk as SAELens's transcoder class, with its hooks, and
    runs the same function; SAELens's own transcoder files load here with the same function and the
    hook "hook_name->hook_name_out"."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes import transcoder as sl_transcoder

    tc, x = make_transcoder(activation, d_out, skip, hook=TC_NORMALIZED), inputs()
    code = dense_code(tc, x)
    assert 0 < (code > 0).float().mean() < 0.9
    tc.save_pretrained(tmp_path / "out", format="saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out"))
    jump = activation != "relu"
    assert type(theirs).__name__ == SAELENS_TC_CLASSES[jump, skip]
    assert (theirs.cfg.metadata.hook_name, theirs.cfg.metadata.hook_name_out, theirs.cfg.d_out) == \
        ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", d_out)
    with torch.no_grad():
        assert rel_err(theirs(x), tc(x)) < 1e-5
        assert rel_err(theirs.encode(x), code) < 1e-5
    # and back: a file SAELens's own class wrote
    name = SAELENS_TC_CLASSES[jump, skip]
    native_d_out = d_out if activation == "relu" or relu_writes_d_out() else D  # fastsae runs it as JumpReLU
    config = getattr(sl_transcoder, name + "Config")(
        d_in=D, d_sae=N, d_out=native_d_out, apply_b_dec_to_input=False,
        metadata=sae_lens.saes.sae.SAEMetadata(hook_name="blocks.1.ln2.hook_normalized",
                                               hook_name_out="blocks.1.hook_mlp_out", model_name="gpt2"))
    native = getattr(sl_transcoder, name)(config)
    with torch.no_grad():
        for p in native.parameters():
            p.normal_(0, 0.3)
        if jump:
            native.threshold.uniform_(0.0, 0.5)
    native.save_model(str(tmp_path / "native"))
    ours = E2ESAE.from_pretrained(tmp_path / "native").eval()
    assert (ours.metadata["hook"], ours.d_out, ours.skip) == (TC_NORMALIZED, native_d_out, skip)
    assert ours.activation == ("jumprelu" if jump else "relu")
    with torch.no_grad():
        assert rel_err(ours(x), native(x)) < 1e-5
        assert rel_err(dense_code(ours, x), native.encode(x)) < 1e-5


def test_saelens_runs_our_transcoder_in_its_model(tmp_path):
    """SAELens's HookedSAETransformer reads our transcoder at hook_name and writes hook_name_out: the
    logits equal the model with fastsae's transcoder as two plain TransformerLens hooks. (No skip
    path: its splice calls the SAE's encode and decode, not forward, so SAELens 6.54 leaves a
    SkipTranscoder's W_skip out there; docs/formats.md says so.)"""
    sae_lens = pytest.importorskip("sae_lens")
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    model = sae_lens.HookedSAETransformer(HookedTransformerConfig(
        n_layers=2, d_model=D, n_ctx=16, d_head=4, n_heads=4, d_vocab=50, act_fn="gelu"))
    tokens = torch.randint(0, 50, (2, 12))
    tc = make_transcoder("relu", D, False, hook=TC_NORMALIZED)
    tc.save_pretrained(tmp_path / "tc", format="saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"))
    seen = {}

    def read(act, hook):
        seen["x"] = act

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.ln2.hook_normalized", read),
                                                           ("blocks.1.hook_mlp_out", lambda act, hook: tc(seen["x"]))])
        assert rel_err(model.run_with_saes(tokens, saes=[theirs]), expected) < 1e-5
        assert rel_err(expected, model(tokens)) > 1e-3  # the transcoder is really in the path


@pytest.mark.parametrize("decoder_norm", ["forward", "project"])
@pytest.mark.parametrize("skip", [False, True])
def test_transcoders_against_sparsify(tmp_path, skip, decoder_norm):
    sparsify = import_sparsify()
    x = inputs().reshape(-1, D)
    tc = make_transcoder("topk", D, skip, decoder_norm)
    tc.save_pretrained(tmp_path / "sp", format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sp")
    assert theirs.cfg.transcode and theirs.cfg.skip_connection == skip
    assert_sparsify_runs_like(theirs, tc, x)
    # a run with an SAE and a transcoder (fastsae export), read by SparseCoder.load_many
    saes = {TC_HOOK: tc, "blocks.2.hook_resid_pre": make_sae("topk", decoder_norm, hook="blocks.2.hook_resid_pre")}
    formats.export(None, "sparsify", tmp_path / "run", layers_name="h", records={h: s.to_record() for h, s in saes.items()})
    theirs = sparsify.SparseCoder.load_many(str(tmp_path / "run"), local=True)
    assert sorted(theirs) == ["h.1", "h.1.mlp"] and theirs["h.1.mlp"].cfg.transcode
    assert_sparsify_runs_like(theirs["h.1.mlp"], tc, x)
    assert_sparsify_runs_like(theirs["h.1"], saes["blocks.2.hook_resid_pre"], x)
    # and back: a transcoder sparsify itself wrote, under the MLP's hookpoint
    native = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N, k=K, transcode=True,
                                                                skip_connection=skip))
    with torch.no_grad():
        native.W_dec.normal_()  # a transcoder's starts at zero
        native.b_dec.normal_()
        native.encoder.bias.normal_(0, 0.3)
        if skip:
            native.W_skip.normal_(0, 0.3)
    native.save_to_disk(tmp_path / "native" / "h.1.mlp")
    ours = E2ESAE.from_pretrained(tmp_path / "native")
    assert (ours.metadata["hook"], ours.skip) == (TC_HOOK, skip)
    assert_sparsify_runs_like(native, ours, x)


def test_one_model_is_the_given_one_or_the_one_the_saes_name():
    """eval, analyze and finetune decide the model their SAEs read in one function."""
    assert formats.one_model(["gpt2", None, "gpt2"]) == "gpt2"
    assert formats.one_model(["gpt2", "pythia-70m"], "embedded") == "embedded"
    with pytest.raises(ValueError, match=r"give --model NAME_OR_DIR: the SAEs name several models \(gpt2, pythia-70m\)"):
        formats.one_model(["pythia-70m", "gpt2"])
    with pytest.raises(ValueError, match="do not name their model"):
        formats.one_model([None])
