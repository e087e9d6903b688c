"""fastsae.model.embedded: the corpus split, the tokenizer, and the cached build (with a tiny config
through the same code path as the real pretraining)."""

import pytest
import torch

import fastsae.model.embedded as embedded
from fastsae.model.embedded import EmbeddedConfig, embedded_corpus, embedded_model_dir, ensure_embedded_model

THREADS = torch.get_num_threads()
TINY = EmbeddedConfig(
    vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_ctx=32, steps=3, batch_size=4, warmup_steps=1, max_corpus_chars=8000
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, ensure_embedded_model(root, config=TINY, progress=False)


def test_corpus_split_is_deterministic_and_disjoint():
    train, held_out = embedded_corpus("train"), embedded_corpus("eval")
    assert len(train) > 200_000 and len(held_out) > 20_000  # a few hundred KB of English
    assert embedded_corpus("eval") == held_out and embedded_corpus("train") == train
    # Every 10th paragraph is held out (the help topics repeat some paragraphs, so the texts of
    # the two splits may share a few; their positions never do).
    paragraphs = embedded._paragraphs()
    assert held_out.split("\n\n") == [p for i, p in enumerate(paragraphs) if i % 10 == 9]
    assert train.split("\n\n") == [p for i, p in enumerate(paragraphs) if i % 10 != 9]
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        embedded_corpus("test")


def test_tokenizer_round_trip_and_determinism():
    text = embedded_corpus("train")[:30_000]
    a = embedded.train_tokenizer(text, 400)
    b = embedded.train_tokenizer(text, 400)
    assert a.get_vocab() == b.get_vocab()
    sample = "Python's for statement iterates over the items of any sequence.\n\n  x = [1, 2]"
    assert a.decode(a.encode(sample, add_special_tokens=False)) == sample


def test_build_loads_offline_and_is_cached(built, monkeypatch):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    root, path = built
    assert path == embedded_model_dir(root, TINY) and path.name.startswith(f"embedded-{embedded.EMBEDDED_VERSION}-")
    tok = AutoTokenizer.from_pretrained(path)
    text = "The with statement is used to wrap the execution of a block."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == embedded.EOS
    model = GPT2LMHeadModel.from_pretrained(path)
    assert model.config.n_layer == 1 and model.config.n_ctx == 32
    stats = embedded.embedded_stats(root, TINY)
    assert stats["eval_loss_after"] < stats["eval_loss_before"]

    # The second call finds the cache and does not build again.
    monkeypatch.setattr(embedded, "_build", lambda *a: pytest.fail("rebuilt a cached model"))
    assert ensure_embedded_model(root, config=TINY, progress=False) == path


def test_loads_as_language_model(built, capsys):
    from fastsae.model.lm import LanguageModel

    _, path = built
    capsys.readouterr()
    lm = LanguageModel.load(str(path))
    assert capsys.readouterr() == ("", "")  # no "Loading weights" bar, no "Moving model to device"
    tokens = lm.to_tokens("The if statement is used for conditional execution")
    hidden, _ = lm.clean_run(tokens, [])
    assert hidden.shape == (1, tokens.shape[1], 32)


def test_crash_leaves_no_cache_dir(tmp_path, monkeypatch):
    real_build = embedded._build

    def crash(out, config, **kwargs):
        (out / "config.json").write_text("{}")  # half-written model
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_model(tmp_path, config=TINY, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp dir is left

    monkeypatch.setattr(embedded, "_build", real_build)
    path = ensure_embedded_model(tmp_path, config=TINY, progress=False)
    assert (path / "config.json").is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_build_is_deterministic_and_force_rebuilds(built, tmp_path, capsys):
    from safetensors.torch import load_file

    _, first = built
    torch.set_num_threads(2)
    try:
        second = ensure_embedded_model(tmp_path, config=TINY, progress=True)
        assert torch.get_num_threads() == 2  # pretraining runs on one thread, then restores the caller's
    finally:
        torch.set_num_threads(THREADS)
    err = capsys.readouterr().err
    assert "pretraining the embedded model" in err and "embedded model ready" in err
    assert "pretraining: 100%" in err and f"{TINY.steps}/{TINY.steps}" in err and "tok_s=" in err  # the bar
    assert "Writing model shards" not in err and "Loading weights" not in err  # transformers' bars
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    again = ensure_embedded_model(tmp_path, config=TINY, force=True, progress=False)
    assert again == second and (second / embedded._DONE_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [second.name]  # the old copy is gone


def test_quiet_transformers_progress_restores_the_callers_setting():
    from transformers.utils import logging as hf_logging

    def bar_is_real():
        return not isinstance(hf_logging.tqdm(range(1), disable=True), hf_logging.EmptyTqdm)

    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        for users_choice in (hf_logging.enable_progress_bar, hf_logging.disable_progress_bar):
            users_choice()
            before = bar_is_real()
            with embedded.quiet_transformers_progress():
                assert not bar_is_real()
            assert bar_is_real() == before == (users_choice is hf_logging.enable_progress_bar)
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
