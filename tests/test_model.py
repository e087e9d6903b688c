"""fastsae.model.lm: splicing into TransformerLens models (bridge on TL >= 3.9, HookedTransformer on
TL 3.x). Tiny random GPT-2 models saved to disk and loaded through the by-directory path."""

import pytest
import torch

from fastsae.model.backends import bridge_class as _bridge_class, hooked_transformer_class as _hooked_transformer_class
from fastsae.model.lm import LanguageModel
from tests.helpers_dispatch import AllocationRecorder
from tests.helpers_models import save_tiny_gpt2

N_LAYERS, D_MODEL = 3, 32
APIS = [
    pytest.param("bridge", marks=pytest.mark.skipif(_bridge_class() is None, reason="no TransformerBridge")),
    pytest.param(
        "hooked",
        marks=pytest.mark.skipif(_hooked_transformer_class() is None, reason="no HookedTransformer (TL >= 4)"),
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), n_layer=N_LAYERS, n_embd=D_MODEL)


@pytest.fixture(scope="module", params=APIS)
def lm(request, model_dir):
    return LanguageModel.load(str(model_dir), api=request.param)


@pytest.fixture
def tokens(lm):
    return torch.randint(0, lm.d_vocab, (2, 12))


def logits_of(lm, hidden):
    out = hidden @ lm.W_U
    return out + lm.b_U if lm.b_U is not None else out


def no_fwd_hooks_left(lm):
    return all(len(hp._forward_hooks) == 0 for hp in lm.model.hook_dict.values())


def test_attributes_and_frozen(lm):
    assert (lm.n_layers, lm.d_model) == (N_LAYERS, D_MODEL)
    assert lm.n_ctx == 64 and lm.tokenizer is not None
    assert lm.W_U.shape == (D_MODEL, lm.d_vocab)
    assert lm.b_U is None or lm.b_U.shape == (lm.d_vocab,)
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert not lm.model.training


def test_wrap(lm):
    again = LanguageModel.wrap(lm.model)
    assert again.api == lm.api and again.d_vocab == lm.d_vocab
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        LanguageModel.wrap(torch.nn.Linear(2, 2))


def test_clean_run_matches_model_logits(lm, tokens):
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    with torch.no_grad():
        reference = lm.model(tokens)
    hidden, cache = lm.clean_run(tokens, ["blocks.1.hook_resid_pre", last])
    assert hidden.shape == (2, 12, D_MODEL)
    torch.testing.assert_close(logits_of(lm, hidden), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_of(lm, lm.final_hidden(cache[last])), reference, rtol=1e-5, atol=1e-5)
    assert not cache["blocks.1.hook_resid_pre"].requires_grad
    assert no_fwd_hooks_left(lm)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.0.hook_resid_post",
                                  "blocks.1.hook_attn_out", "blocks.2.hook_resid_mid"])
def test_spliced_run_matches_run_with_hooks(lm, tokens, hook):
    noise = 0.3 * torch.randn(2, 12, D_MODEL)

    def edit(x):
        return 1.5 * x + noise

    with torch.no_grad():
        reference = lm.model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: edit(x))])
        hidden, _ = lm.spliced_run(tokens, {hook: edit})
        clean, _ = lm.clean_run(tokens, [])
    torch.testing.assert_close(logits_of(lm, hidden), reference, rtol=1e-5, atol=1e-5)
    assert (hidden - clean).abs().max() > 1e-2  # the edit did change the output
    torch.testing.assert_close(lm.logits(tokens, {hook: edit}), reference, rtol=1e-5, atol=1e-5)


def test_start_from_cached_resid_equals_full_run(lm, tokens):
    sae_hooks = ["blocks.1.hook_resid_pre", "blocks.2.hook_mlp_out"]  # two SAEs, the first starts
    start = lm.start_point(sae_hooks[0])
    assert start == "blocks.1.hook_resid_pre"
    _, cache = lm.clean_run(tokens, [start])
    seen = []

    def edit(x):
        seen.append(x.clone())
        return 0.5 * x + 0.1

    replacements = {h: edit for h in sae_hooks}
    capture = ["blocks.2.hook_resid_pre", f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    with torch.no_grad():
        full, full_cap = lm.spliced_run(tokens, replacements, capture_hooks=capture)
        # Count calls into block 0's attention: the started run must not compute block 0.
        calls = []
        handle = lm.model.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            started, started_cap = lm.spliced_run(
                tokens, replacements, start_hook=start, start_acts=cache[start], capture_hooks=capture
            )
        finally:
            handle.remove()
    assert calls == []
    assert len(seen) == 4  # the replacement at the start hook fired in both runs
    torch.testing.assert_close(seen[2], cache[start])
    torch.testing.assert_close(started, full, rtol=1e-6, atol=1e-6)
    for name in capture:
        torch.testing.assert_close(started_cap[name], full_cap[name], rtol=1e-6, atol=1e-6)
    # The block skip is undone: a plain run afterwards is the clean model again.
    with torch.no_grad():
        torch.testing.assert_close(logits_of(lm, lm.clean_run(tokens, [])[0]), lm.model(tokens), rtol=1e-5, atol=1e-5)


def test_start_hook_errors(lm, tokens):
    _, cache = lm.clean_run(tokens, ["blocks.2.hook_resid_pre"])
    acts = cache["blocks.2.hook_resid_pre"]
    ident = {"blocks.2.hook_resid_pre": lambda x: x}
    with pytest.raises(ValueError, match="comes before start_hook"):
        lm.spliced_run(tokens, {"blocks.1.hook_mlp_out": lambda x: x}, start_hook="blocks.2.hook_resid_pre", start_acts=acts)
    with pytest.raises(ValueError, match="together"):
        lm.spliced_run(tokens, ident, start_hook="blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match="hook_resid_pre"):
        lm.spliced_run(tokens, ident, start_hook="blocks.2.hook_mlp_out", start_acts=acts)
    with pytest.raises(ValueError, match="shape"):
        lm.spliced_run(tokens, ident, start_hook="blocks.2.hook_resid_pre", start_acts=acts[:, :5])
    with pytest.raises(ValueError, match="not inside a block"):
        lm.start_point("hook_embed")


def test_gradient_flows_to_replacement_params_and_captures(lm, tokens):
    scale = torch.nn.Parameter(torch.ones(D_MODEL))
    _, cache = lm.clean_run(tokens, ["blocks.1.hook_resid_pre"])
    hidden, captured = lm.spliced_run(
        tokens,
        {"blocks.1.hook_resid_pre": lambda x: x * scale},
        start_hook="blocks.1.hook_resid_pre",
        start_acts=cache["blocks.1.hook_resid_pre"],
        capture_hooks=["blocks.2.hook_resid_pre"],
    )
    assert captured["blocks.2.hook_resid_pre"].requires_grad
    (hidden.square().mean() + captured["blocks.2.hook_resid_pre"].square().mean()).backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())
    assert lm.W_U.grad is None


def test_no_hooks_left_after_exception(lm, tokens):
    def boom(x):
        raise RuntimeError("boom")

    _, cache = lm.clean_run(tokens, ["blocks.1.hook_resid_pre"])
    with pytest.raises(RuntimeError, match="boom"):
        lm.spliced_run(tokens, {"blocks.2.hook_resid_pre": boom}, capture_hooks=["blocks.1.hook_mlp_out"])
    assert no_fwd_hooks_left(lm)
    with pytest.raises(RuntimeError, match="boom"):
        lm.spliced_run(tokens, {"blocks.2.hook_resid_pre": boom}, start_hook="blocks.1.hook_resid_pre",
                       start_acts=cache["blocks.1.hook_resid_pre"])
    assert no_fwd_hooks_left(lm)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        lm.spliced_run(tokens, {"blocks.1.hook_resid_pre": lambda x: x[:, :3]})
    assert no_fwd_hooks_left(lm)
    # ...and the model is intact: the block skip was undone too.
    with torch.no_grad():
        torch.testing.assert_close(logits_of(lm, lm.clean_run(tokens, [])[0]), lm.model(tokens), rtol=1e-5, atol=1e-5)


def test_hook_names_and_block_index(lm):
    names = lm.hook_names()
    for layer in range(N_LAYERS):
        for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out"):
            assert f"blocks.{layer}.{h}" in names
            assert lm.block_index(f"blocks.{layer}.{h}") == layer
    assert lm.block_index("hook_embed") == -1
    assert lm.start_point("blocks.2.hook_mlp_out") == "blocks.2.hook_resid_pre"


@pytest.mark.parametrize("bad", ["blocks.9.hook_resid_pre", "blocks.1.hook_resid_prex", "resid_pre", ""])
def test_bad_hook_names(lm, tokens, bad):
    with pytest.raises(ValueError, match="unknown hook point") as err:
        lm.validate_hook(bad)
    assert repr(bad) in str(err.value) and "blocks.1.hook_resid_pre" in str(err.value)
    with pytest.raises(ValueError, match="unknown hook point"):
        lm.spliced_run(tokens, {bad: lambda x: x})
    with pytest.raises(ValueError, match="unknown hook point"):
        lm.clean_run(tokens, [bad])


def test_no_logits_materialized(lm, tokens):
    B, T = tokens.shape
    _, cache = lm.clean_run(tokens, ["blocks.1.hook_resid_pre"])
    with AllocationRecorder() as rec:
        lm.clean_run(tokens, ["blocks.1.hook_resid_pre"])
        lm.spliced_run(tokens, {"blocks.1.hook_resid_pre": lambda x: 2 * x})
        lm.spliced_run(tokens, {"blocks.1.hook_resid_pre": lambda x: 2 * x}, start_hook="blocks.1.hook_resid_pre",
                       start_acts=cache["blocks.1.hook_resid_pre"])
    def is_logits(s):
        return bool(s) and s[-1] == lm.d_vocab and (B * T in s or (B, T) == s[:2])

    assert rec.shapes, "the recorder saw no ops"
    assert not [s for s in rec.shapes if is_logits(s)]
    with AllocationRecorder() as rec:  # the recorder does see logits when they exist
        lm.logits(tokens)
    assert [s for s in rec.shapes if is_logits(s)]


def test_activations_stop_after_the_last_hook(lm, tokens):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    _, cache = lm.clean_run(tokens, hooks)
    blocks_run = []
    later = [(f"blocks.{i}.hook_resid_pre", lambda acts, hook, i=i: blocks_run.append(i)) for i in range(N_LAYERS)]
    with lm.hooks(later):
        acts = lm.activations(tokens, hooks)
    assert blocks_run == [0, 1]  # block 2 never ran
    for hook in hooks:
        assert torch.equal(acts[hook], cache[hook]) and not acts[hook].requires_grad


def test_tokenize(lm):
    ids = lm.tokenize("the quick brown fox")[0]
    assert lm.tokenizer.decode(ids) == "the quick brown fox"
    assert lm.to_tokens("the quick brown fox").shape == (1, len(ids))
    with pytest.raises(ValueError, match="equal token length"):
        lm.to_tokens(["the", "the quick brown fox"])


def test_bad_arguments(lm, tokens):
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        lm.clean_run(tokens.float(), [])
    with pytest.raises(ValueError, match="n_ctx"):
        lm.clean_run(torch.zeros(1, 65, dtype=torch.long), [])
    with pytest.raises(ValueError, match="api must be one of"):
        LanguageModel.load("gpt2", api="nope")


# ---------------------------------------------------------------- model sources and processed weights (issue 9)


def test_a_hub_model_offline_is_one_fast_error(tmp_path, monkeypatch):
    import time

    from fastsae.model import sources as lm_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(lm_module.ModelUnavailableError, match="needs hub access .*local directory.*HF_HUB_OFFLINE"):
        LanguageModel.load("openai-community/gpt2")
    assert time.perf_counter() - start < 5
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(address, timeout=None):
        raise OSError("Name or service not known")

    monkeypatch.setattr("socket.create_connection", unreachable)
    with pytest.raises(lm_module.ModelUnavailableError, match=r"needs hub access .*huggingface\.co is not reachable"):
        LanguageModel.load("gpt2")
    with pytest.raises(FileNotFoundError, match="no model directory at ./no/such/model"):
        LanguageModel.load("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LanguageModel.load(str(tmp_path / "empty"))


@pytest.mark.skipif(_bridge_class() is None, reason="no TransformerBridge")
def test_a_bridge_with_processed_weights_is_refused(model_dir):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(model_dir))
    bridge.enable_compatibility_mode(no_processing=True)  # hook aliases only: the HF weights as they are
    assert LanguageModel.wrap(bridge).d_model == D_MODEL
    processed = TransformerBridge.boot_transformers(str(model_dir))
    processed.enable_compatibility_mode()  # fold_ln, center_writing_weights, center_unembed
    with pytest.raises(ValueError, match="weights were processed .* do not transfer"):
        LanguageModel.wrap(processed)


@pytest.mark.skipif(_hooked_transformer_class() is None, reason="no HookedTransformer (TL >= 4)")
def test_a_hooked_transformer_with_centered_weights_is_refused(model_dir):
    model = LanguageModel.load(str(model_dir), api="hooked").model  # a fresh copy: it gets edited
    with torch.no_grad():
        model.W_E.sub_(model.W_E.mean(-1, keepdim=True))  # what center_writing_weights does to W_E
    with pytest.raises(ValueError, match="center_writing_weights.*from_pretrained_no_processing"):
        LanguageModel.wrap(model)


@pytest.mark.skipif(_hooked_transformer_class() is None or _bridge_class() is None,
                    reason="TL 3.x with both APIs")
def test_tl3_falls_back_to_the_bridge_where_hooked_transformer_cannot_load(tmp_path, capsys):
    import json

    path = save_tiny_gpt2(tmp_path / "no_n_ctx", n_layer=2, n_embd=D_MODEL)
    config = json.loads((path / "config.json").read_text())
    del config["n_ctx"]  # HookedTransformer 3.x reads config.n_ctx for GPT-2; the bridge does not need it
    (path / "config.json").write_text(json.dumps(config))
    lm = LanguageModel.load(str(path))
    assert lm.api == "bridge"
    err = capsys.readouterr().err
    assert "HookedTransformer cannot load" in err and "using the TransformerBridge (model.api=bridge)" in err
    with pytest.raises(ValueError, match="HookedTransformer cannot load .*set model.api=bridge"):
        LanguageModel.load(str(path), api="hooked")


def test_a_transformer_lens_alias_is_found_in_the_cache_under_its_repo(monkeypatch):
    import huggingface_hub

    from fastsae.model import sources as lm_module

    cached = {"gpt2"}  # the hub repo TransformerLens's alias gpt2-small names
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename: "/cache/config.json" if repo in cached else None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_module.check_model_source("gpt2-small")  # no error: cached as gpt2
    with pytest.raises(lm_module.ModelUnavailableError, match="HF_HUB_OFFLINE is set"):
        lm_module.check_model_source("pythia-70m")
