"""`fastsae dashboard`: the one-pass collection against dense references, the logit effect, the
exact token texts, the site's files and errors, and the page itself in headless Chromium.

The browser tests need Debian's `chromium` and `chromium-driver` (and selenium, in the dev extra).
Where they are missing the tests skip, except with FASTSAE_REQUIRE_BROWSER=1 (CI sets it), where
they fail.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

import fastsae.ops.checks as checks
from fastsae import E2ESAE
from fastsae.analysis.latent_stats import LatentStats
from fastsae.analysis.stream import ActivationStream, held_out_batches, load_language_model, load_targets
from fastsae.cli import main
from fastsae.dashboard import DashboardError, SegmentTopK, build_dashboard
from fastsae.dashboard.collect import EMPTY_TOKEN, DashboardCollector
from fastsae.dashboard.weights import final_norm, logit_effect, token_texts
from helpers_dispatch import AllocationRecorder
from helpers_models import TINY_TEXT, save_tiny_gpt2, train_tiny_tokenizer

HOOK = "blocks.1.hook_resid_pre"
SCRIPT_TOKEN, AMP_TOKEN = "<script>alert(1)</script>", "&amp;"


# ------------------------------------------------------------------ references

def dense_codes(sae, batches):
    """Per batch, the dense code [B*T, n] of encode_sparse (the collector's values, exactly)."""
    return [sae.encode_sparse(x).to_dense(sae.n_latents).reshape(-1, sae.n_latents) for x in batches]


def dense_top(dense: torch.Tensor, latent: int, k: int) -> list[tuple[float, int]]:
    """(value, position) of a latent's k largest activations, ties to the earlier position."""
    column = dense[:, latent]
    active = (column > 0).nonzero().squeeze(1).tolist()
    return sorted(((float(column[p]), p) for p in active), key=lambda vp: (-vp[0], vp[1]))[:k]


def window(tokens_flat, dense, position, latent, ctx, before, after):
    row, col = divmod(position, ctx)
    ids, acts = [], []
    for c in range(col - before, col + after + 1):
        inside = 0 <= c < ctx
        ids.append(int(tokens_flat[row * ctx + c]) if inside else EMPTY_TOKEN)
        acts.append(float(dense[row * ctx + c, latent]) if inside else 0.0)
    return ids, acts


def sparse_sae(activation="relu", d=16, n=48, k=None, seed=0, shift=-0.8):
    torch.manual_seed(seed)
    sae = E2ESAE(d, n, activation, k)
    with torch.no_grad():
        sae.b_enc.add_(shift)
        sae.b_enc[5] = -1e3  # a dead latent
    return sae


# ------------------------------------------------------------------ SegmentTopK

@pytest.mark.parametrize("unique", [False, True])
def test_segment_topk_is_the_brute_force_top_k_however_batched(unique):
    g = torch.Generator().manual_seed(0)
    n_entries, n_segments, k = 3000, 40, 6
    segments = torch.randint(0, n_segments, (n_entries,), generator=g)
    keys = torch.randint(0, 25, (n_entries,), generator=g).float()  # many ties
    ids = torch.randint(0, 15, (n_entries,), generator=g)

    def run(cuts):
        top = SegmentTopK(n_segments, k, {"position": ((), torch.int64)}, unique=unique)
        for a, b in zip(cuts[:-1], cuts[1:]):
            top.update(segments[a:b], keys[a:b], lambda e, a=a: {"position": e + a}, ids=ids[a:b] if unique else None)
        return top.sort_()

    one = run([0, n_entries])
    many = run([0, 1, 7, 700, 701, 2500, n_entries])
    assert torch.equal(one.keys, many.keys) and torch.equal(one.payload["position"], many.payload["position"])
    for s in range(n_segments):
        entries = (segments == s).nonzero().squeeze(1).tolist()
        if unique:  # each id's largest key, the earliest on ties
            best = {}
            for e in entries:
                if int(ids[e]) not in best or keys[e] > keys[best[int(ids[e])]]:
                    best[int(ids[e])] = e
            entries = list(best.values())
        expected = sorted(entries, key=lambda e: (-float(keys[e]), e))[:k]
        assert one.payload["position"][s, :len(expected)].tolist() == expected
        assert one.keys[s, :len(expected)].tolist() == [float(keys[e]) for e in expected]
        assert (one.keys[s, len(expected):] == float("-inf")).all()


# ------------------------------------------------------------------ the collector

@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4)])
def test_collector_matches_dense_references(activation, k):
    sae = sparse_sae(activation, k=k)
    g = torch.Generator().manual_seed(1)
    B, T, V, before, after = 3, 16, 50, 4, 2
    batches_x = [torch.randn(B, T, 16, generator=g) for _ in range(5)]
    batches_t = [torch.randint(0, V, (B, T), generator=g) for _ in range(5)]
    collector = DashboardCollector({"s": (HOOK, sae)}, d_vocab=V, top_k=5, n_samples=7, token_latents=4,
                                   before=before, after=after)
    for x, t in zip(batches_x, batches_t):
        collector.update(t, {HOOK: x})
    rec = collector.finish().records["s"]
    dense = torch.cat(dense_codes(sae, batches_x))
    tokens = torch.cat([t.reshape(-1) for t in batches_t])
    n = sae.n_latents

    for latent in range(n):
        expected = dense_top(dense, latent, 5)
        got = rec.top.keys[latent][:len(expected)].tolist()
        assert got == [v for v, _ in expected], latent
        assert rec.top.payload["position"][latent, :len(expected)].tolist() == [p for _, p in expected]
        for slot, (value, position) in enumerate(expected):
            ids, acts = window(tokens, dense, position, latent, T, before, after)
            assert rec.top.payload["tokens"][latent, slot].tolist() == ids
            assert rec.top.payload["acts"][latent, slot].tolist() == acts
            assert float(rec.top.payload["value"][latent, slot]) == value
        # samples: min(n_samples, firings) distinct firings of this latent, with their windows
        firings = int((dense[:, latent] > 0).sum())
        filled = int(rec.samples.counts()[latent])
        assert filled == min(7, firings)
        for slot in range(filled):
            position = int(rec.samples.payload["position"][latent, slot])
            assert float(rec.samples.payload["value"][latent, slot]) == float(dense[position, latent]) > 0
            ids, acts = window(tokens, dense, position, latent, T, before, after)
            assert rec.samples.payload["acts"][latent, slot].tolist() == acts
        assert len(set(rec.samples.payload["position"][latent, :filled].tolist())) == filled
    assert rec.top.counts()[5] == 0 and rec.samples.counts()[5] == 0  # the dead latent

    for token in range(V):  # the latents of largest activation on each token
        on_token = dense[tokens == token].amax(0) if (tokens == token).any() else torch.zeros(n)
        order = sorted((i for i in range(n) if on_token[i] > 0), key=lambda i: (-float(on_token[i]), i))[:4]
        filled = int(rec.by_token.counts()[token])
        assert rec.by_token.payload["id"][token, :filled].tolist() == order[:filled] and filled == len(order)

    stats = LatentStats(n)
    for x in batches_x:
        stats.update(sae.encode_sparse(x))
    assert torch.equal(rec.stats.count, stats.count) and torch.equal(rec.stats.histogram, stats.histogram)
    assert torch.equal(rec.stats.activation_max, stats.activation_max) and rec.stats.n_tokens == stats.n_tokens
    torch.testing.assert_close(rec.stats.activation_sum, stats.activation_sum)


def test_collection_is_the_same_in_one_batch_or_many():
    sae = sparse_sae()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(8, 16, 16, generator=g), torch.randint(0, 50, (8, 16), generator=g)

    def run(rows):
        collector = DashboardCollector({"s": (HOOK, sae)}, d_vocab=50, top_k=4, n_samples=5, token_latents=3)
        for r in range(0, 8, rows):
            collector.update(t[r:r + rows], {HOOK: x[r:r + rows]})
        return collector.finish().records["s"]

    one, many = run(8), run(3)
    for name in ("top", "samples", "by_token"):
        a, b = getattr(one, name), getattr(many, name)
        assert torch.equal(a.keys, b.keys), name
        for key in a.payload:
            assert torch.equal(a.payload[key], b.payload[key]), (name, key)


def test_samples_spread_over_the_stream():
    """The hash keys pick a uniform sample: the sampled positions of a frequent latent are spread
    over the stream, not the first or last firings."""
    sae = sparse_sae(shift=0.5)  # dense enough that latents fire on hundreds of tokens
    g = torch.Generator().manual_seed(3)
    collector = DashboardCollector({"s": (HOOK, sae)}, d_vocab=50, n_samples=20)
    for _ in range(20):
        collector.update(torch.randint(0, 50, (4, 16), generator=g), {HOOK: torch.randn(4, 16, 16, generator=g)})
    rec = collector.records["s"]
    frequent = (rec.stats.count > 200).nonzero().squeeze(1)
    assert frequent.numel() > 5
    mean_position = rec.samples.payload["position"][frequent].float().mean() / collector.n_tokens
    assert 0.35 < float(mean_position) < 0.65


def test_no_tokens_x_latents_tensor(monkeypatch):
    """Every temporary of the pass stays below the dense code's size (the encoder chunk budget set to
    1,024 elements as in test_analysis; the state is n x k x window, the token index V x k)."""
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 1024)
    n_tokens, n_latents = 512, 256
    sae = sparse_sae(n=n_latents, shift=-1.0)
    x, t = torch.randn(8, 64, 16), torch.randint(0, 50, (8, 64))
    collector = DashboardCollector({"s": (HOOK, sae)}, d_vocab=50, top_k=4, n_samples=4, before=3, after=1)
    recorder = AllocationRecorder()
    with recorder:
        collector.update(t, {HOOK: x})
    largest = max(torch.Size(s).numel() for s in recorder.shapes)
    assert collector.records["s"].stats.n_alive > 0
    assert largest < n_tokens * n_latents, f"a temporary of {largest} elements (dense code {n_tokens * n_latents})"


# ------------------------------------------------------------------ the tiny model, its SAE and data

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 whose tokenizer has a <script> token and an &amp; token, a text corpus using
    them, a sparse ReLU SAE at HOOK saved as files, and a config reading the corpus."""
    root = tmp_path_factory.mktemp("dashboard")
    tokenizer = train_tiny_tokenizer()
    tokenizer.add_tokens([SCRIPT_TOKEN, AMP_TOKEN])
    model = save_tiny_gpt2(root / "model", n_layer=2, n_embd=32, n_ctx=64, tokenizer=tokenizer)
    corpus = root / "corpus.txt"
    corpus.write_text((TINY_TEXT + f"x = {SCRIPT_TOKEN} and y {AMP_TOKEN} z;\n\tdef f():\n") * 30)
    config = root / "tiny.yaml"
    config.write_text(f"""name: tiny
device: cpu
model: {{name: {model}}}
saes: {{hooks: [{HOOK}], n_latents: 64}}
data: {{source: text, path: {corpus}, context_length: 16, eval_fraction: 0.5}}
eval: {{n_tokens: 512, batch_size: 4}}
""")
    sae = calibrated_sae(model, config)
    sae_dir = sae.save_pretrained(root / "sae")
    return {"root": root, "model": model, "config": config, "sae": sae, "spec": f"{sae_dir}@{HOOK}",
            "tokenizer": tokenizer}


def calibrated_sae(model, config, n_latents=64, hook=HOOK, **coder):
    """A ReLU SAE at HOOK of the tiny model whose latents each fire on roughly 5-20 % of the tokens
    (random encoder directions, thresholds at 1-1.6 standard deviations of the data's projection
    on them), latent 5 dead; a random SAE fires on almost nothing or everything here. hook: where
    it reads (a transcoder's IN), coder: E2ESAE's d_out, skip, metadata."""
    from fastsae.analysis.stream import TokenBatches
    from fastsae.train.config import load_config

    cfg = load_config(str(config), [])
    lm = load_language_model(cfg, "cpu")
    x = torch.cat([lm.activations(t, [hook])[hook].reshape(-1, lm.d_model)
                   for t in TokenBatches(held_out_batches(lm, cfg), 256)])
    g = torch.Generator().manual_seed(0)
    sae = E2ESAE(lm.d_model, n_latents, "relu", **coder)
    directions = torch.randn(lm.d_model, n_latents, generator=g)
    mean = x.mean(0)
    W_enc = directions / ((x - mean) @ directions).std(0)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(-(mean @ W_enc) - 1.0 - 0.6 * torch.rand(n_latents, generator=g))
        sae.b_enc[5] = -1e3
        sae.W_dec.copy_(torch.randn(n_latents, sae.d_out, generator=g))
    return sae


def stream_reference(tiny, n_tokens):
    """The tokens and dense codes of the stream a dashboard reads (same batches, same encoder)."""
    inputs = load_targets([tiny["spec"]], model=str(tiny["model"]), config=str(tiny["config"]), device="cpu")
    lm = load_language_model(inputs.config, "cpu")
    sae = inputs.targets[0].sae
    tokens, dense = [], []
    for batch in ActivationStream(lm, held_out_batches(lm, inputs.config), [HOOK], n_tokens):
        tokens.append(batch.tokens.reshape(-1))
        dense += dense_codes(sae, [batch.activations[HOOK]])
    return lm, torch.cat(tokens), torch.cat(dense)


def read_data(path: Path):
    """The JSON literal of a data script (fastsaeDashboard.register(kind, name, DATA);)."""
    text = path.read_text()
    match = re.fullmatch(r'fastsaeDashboard\.register\("[^"]*","[^"]*",(.*)\);\n', text, re.S)
    assert match, text[:200]
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def site(tiny):
    out = tiny["root"] / "site"
    record = build_dashboard(tiny["spec"], out, model=str(tiny["model"]), config=str(tiny["config"]), n_tokens=512,
                             device="cpu", top_k=20, n_samples=8, before=8, after=3, shard_size=16, token_shard=64,
                             log=None)
    return out, record


# ------------------------------------------------------------------ weights: logit effect, token texts

def test_logit_effect_is_the_folded_layer_norm_direction(tiny):
    lm = load_language_model(load_targets([tiny["spec"]], model=str(tiny["model"]), config=str(tiny["config"]),
                                          device="cpu").config, "cpu")
    gain, centres, note = final_norm(lm)
    assert centres and gain is not None and "LayerNorm" in note and "fold_ln" in note
    sae = tiny["sae"]
    effect, _ = logit_effect(sae.W_dec, lm, k=5)
    d = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    norm = getattr(lm.model.ln_final, "original_component", lm.model.ln_final)  # bridge / HookedTransformer
    gamma = norm.weight if hasattr(norm, "weight") else norm.w
    direct = ((d - d.mean(1, keepdim=True)) * gamma) @ lm.W_U
    torch.testing.assert_close(effect["top_values"], direct.topk(5, dim=1).values)
    assert torch.equal(effect["top_ids"], direct.topk(5, dim=1).indices)
    assert torch.equal(effect["bottom_ids"], direct.topk(5, dim=1, largest=False).indices)
    # it is the model's own logit change for a small step along the direction, up to 1/sigma(x), where
    # the norm's projection term vanishes (a residual whose centred part is orthogonal to center(d))
    g = torch.Generator().manual_seed(0)
    for latent in (0, 7):
        c = d[latent] - d[latent].mean()
        x = torch.randn(3, 32, generator=g) * 2 + 1
        x = x - ((x - x.mean(1, keepdim=True)) @ c)[:, None] * c / c.dot(c)
        step = 1e-2 * d[latent]
        change = ((lm.final_hidden(x + step) - lm.final_hidden(x)) @ lm.W_U).detach()
        for row in range(3):
            corr = torch.corrcoef(torch.stack([change[row], direct[latent].detach()]))[0, 1]
            assert corr > 0.9999, (latent, row, corr)


def test_token_texts_are_exact(tiny):
    tokenizer = tiny["tokenizer"]
    texts, byte_ids = token_texts(tokenizer, len(tokenizer) + 2)
    assert texts[tokenizer.convert_tokens_to_ids(SCRIPT_TOKEN)] == SCRIPT_TOKEN
    assert texts[tokenizer.convert_tokens_to_ids(AMP_TOKEN)] == AMP_TOKEN
    assert texts[tokenizer.convert_tokens_to_ids("Ċ")] == "\n" and texts[tokenizer.convert_tokens_to_ids("Ġ")] == " "
    # a lone UTF-8 lead byte (byte-level piece "â" is byte 0xe2) shows as its byte, not U+FFFD
    assert texts[tokenizer.convert_tokens_to_ids("â")] == "\\xe2" and tokenizer.convert_tokens_to_ids("â") in byte_ids
    assert tokenizer.convert_tokens_to_ids("Ġthe") not in byte_ids
    assert texts[-2:] == [f"<unused {len(tokenizer)}>", f"<unused {len(tokenizer) + 1}>"]
    assert all("\ufffd" not in t for t in texts)


# ------------------------------------------------------------------ the site's files

def test_site_files_are_sharded_and_match_the_stream(tiny, site):
    out, record = site
    lm, tokens, dense = stream_reference(tiny, 512)
    meta = read_data(out / "data" / "meta.js")
    sae_meta = meta["saes"][0]
    key, n = sae_meta["key"], sae_meta["n_latents"]
    assert meta["tokens"] == record["tokens"] == tokens.numel() == 512
    assert sae_meta["alive"] == int((dense > 0).any(0).sum()) and sae_meta["dead"] >= 1
    shards = sorted((out / "data" / key / "latents").iterdir())
    assert len(shards) == -(-n // 16) and len(sorted((out / "data" / key / "tokens").iterdir())) == -(-lm.d_vocab // 64)
    index = read_data(out / "data" / key / "index.js")
    assert index["count"] == (dense > 0).sum(0).tolist()
    for latent in (0, 17, n - 1):
        shard = read_data(shards[latent // 16])
        rec = shard["records"][latent - shard["start"]]
        expected = dense_top(dense, latent, 20)
        assert [c[1] for c in rec["top"]] == [p for _, p in expected]
        assert [c[0] for c in rec["top"]] == pytest.approx([v for v, _ in expected], rel=1e-3)
        for ctx, (_, position) in zip(rec["top"], expected):
            ids, _ = window(tokens, dense, position, latent, 16, 8, 3)
            assert ctx[3] == [i for i in ids if i != EMPTY_TOKEN] and ctx[3][ctx[2]] == int(tokens[position])
    vocab = read_data(out / "data" / "vocab.js")["texts"]
    assert vocab[tiny["tokenizer"].convert_tokens_to_ids(SCRIPT_TOKEN)] == SCRIPT_TOKEN
    assert (out / "latent_stats" / key / "latent_stats.json").is_file()
    assert json.loads((out / "dashboard.json").read_text())["tokens"] == 512
    assert not list(out.parent.glob(".site.dashboard-*")), "the staging directory is left behind"


def test_a_previous_dashboard_is_replaced_and_other_directories_refused(tiny, tmp_path):
    out = tmp_path / "dash"
    args = dict(model=str(tiny["model"]), config=str(tiny["config"]), n_tokens=64, device="cpu", log=None)
    build_dashboard(tiny["spec"], out, **args)
    (out / "stale.txt").write_text("from an old build")
    build_dashboard(tiny["spec"], out, **args)
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(DashboardError, match="not empty and holds no dashboard"):
        build_dashboard(tiny["spec"], other, **args)
    assert (other / "mine.txt").read_text() == "keep me"


def error_line(capsys) -> str:
    """The command's error: one line starting "fastsae dashboard: error:" (after the model loader's
    progress bars, which end with a carriage return)."""
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if line.startswith("fastsae dashboard: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_bad_input_is_a_one_line_error(tiny, tmp_path, capsys):
    base = ["--model", str(tiny["model"]), "--config", str(tiny["config"]), "--tokens", "64", "--device", "cpu"]
    # an SAE whose d_in does not match the hook
    wide = sparse_sae(d=48, n=32).save_pretrained(tmp_path / "wide")
    assert main(["dashboard", f"{wide}@{HOOK}", "--out", str(tmp_path / "a"), *base]) == 2
    err = error_line(capsys)
    assert "d_in=48" in err and "32 wide" in err
    # no alive latent
    dead = sparse_sae(d=32, n=32, shift=-1e4).save_pretrained(tmp_path / "dead")
    assert main(["dashboard", f"{dead}@{HOOK}", "--out", str(tmp_path / "b"), *base]) == 2
    assert "no latent of" in error_line(capsys)
    # a model without a tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(tiny["model"], bare)
    for name in bare.iterdir():
        if "token" in name.name or name.name in ("vocab.json", "merges.txt"):
            name.unlink()
    args = ["dashboard", tiny["spec"], "--out", str(tmp_path / "c"), "--model", str(bare), "--config",
            str(tiny["config"]), "--set", f"model.name={bare}", "--tokens", "64", "--device", "cpu"]
    assert main(args) == 2
    assert "has no tokenizer" in error_line(capsys)
    assert not any((tmp_path / d).exists() for d in "abc"), "a failed build wrote its output directory"


def test_compare_links_each_latent_to_the_other_sae(tiny, tmp_path):
    other = sparse_sae(d=32, n=40, seed=5, shift=-0.3)
    with torch.no_grad():  # latent 3 of the other SAE is latent 9 of the first, latent 11 its opposite
        other.W_dec[3] = tiny["sae"].W_dec[9] * 2
        other.W_dec[11] = -tiny["sae"].W_dec[9]
    other_dir = other.save_pretrained(tmp_path / "other")
    out = tmp_path / "dash"
    build_dashboard(tiny["spec"], out, compare=f"{other_dir}@{HOOK}", model=str(tiny["model"]),
                    config=str(tiny["config"]), n_tokens=256, device="cpu", shard_size=16, log=None)
    meta = read_data(out / "data" / "meta.js")
    first, second = meta["saes"]
    assert first["compare"] == second["key"] and second["compare"] == first["key"]
    rec = read_data(out / "data" / first["key"] / "latents" / "00000.js")["records"][9]
    index = read_data(out / "data" / second["key"] / "index.js")
    if index["count"][3]:  # the copy fired: it is latent 9's nearest in the other SAE, at cosine 1
        assert rec["other"][0][0] == 3 and rec["other"][0][1] == pytest.approx(1.0, abs=1e-3)
    assert all(pair[0] != 9 for pair in rec["near"])  # never its own neighbour
    back = read_data(out / "data" / second["key"] / "latents" / "00000.js")["records"][3]
    assert back["other"][0][0] == 9 or not read_data(out / "data" / first["key"] / "index.js")["count"][9]


TRANSCODER_IN, TRANSCODER_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def test_a_transcoder_reads_in_and_its_logit_effect_is_its_output_row(tiny, tmp_path, capsys):
    """A skip-transcoder IN->OUT (OUT residual-width): its latents fire on the activations at IN, its
    logit effects are its decoder rows (d_out = d_model) through the final norm and W_U; one that
    writes a hook narrower or wider than the residual stream (the MLP's hidden layer) is refused by name."""
    hook = f"{TRANSCODER_IN}->{TRANSCODER_OUT}"
    sae = calibrated_sae(tiny["model"], tiny["config"], hook=TRANSCODER_IN, skip=True, metadata={"hook": hook})
    spec = str(sae.save_pretrained(tmp_path / "transcoder"))
    out = tmp_path / "dash"
    build_dashboard(spec, out, model=str(tiny["model"]), config=str(tiny["config"]), n_tokens=256, device="cpu",
                    shard_size=16, log=None)
    meta = read_data(out / "data" / "meta.js")
    (entry,) = meta["saes"]
    assert entry["hook"] == hook and entry["d_out"] == sae.d_out
    inputs = load_targets([spec], model=str(tiny["model"]), config=str(tiny["config"]), device="cpu")
    lm = load_language_model(inputs.config, "cpu")
    dense = torch.cat(dense_codes(sae, [batch.activations[TRANSCODER_IN] for batch in ActivationStream(
        lm, held_out_batches(lm, inputs.config), [TRANSCODER_IN], 256)]))
    index = read_data(out / "data" / entry["key"] / "index.js")
    assert index["count"] == (dense > 0).sum(0).tolist() and entry["alive"] == int((dense > 0).any(0).sum())
    effect, _ = logit_effect(sae.W_dec, lm, k=10)
    record = read_data(out / "data" / entry["key"] / "latents" / "00000.js")["records"][3]
    assert [pair[0] for pair in record["lp"]] == effect["top_ids"][3].tolist()

    # a transcoder into the MLP's hidden layer (d_mlp = 4 d_model): no logit effect through W_U
    wide = f"{TRANSCODER_IN}->blocks.1.mlp.hook_post"
    hidden = E2ESAE(lm.d_model, 32, "relu", d_out=4 * lm.d_model, metadata={"hook": wide})
    assert main(["dashboard", str(hidden.save_pretrained(tmp_path / "hidden")), "--out", str(tmp_path / "b"),
                 "--model", str(tiny["model"]), "--config", str(tiny["config"]), "--tokens", "64",
                 "--device", "cpu"]) == 2
    err = error_line(capsys)
    assert "writes blocks.1.mlp.hook_post, 128 wide, not the residual stream's d_model=32" in err, err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ in the browser

def _browser():
    """(chromium, chromedriver) paths, or None; the reason when None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[dev]')"
    chromium = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return None, "no chromium / chromedriver (Debian: apt-get install chromium chromium-driver)"
    return (chromium, driver), None


@pytest.fixture(scope="module")
def browser():
    paths, reason = _browser()
    if paths is None:
        if os.environ.get("FASTSAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FASTSAE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    # the background-networking flags keep Chromium from calling out (this network is closed)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="fastsae-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def served(site):
    out, _ = site
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _wait(driver, condition, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _errors(driver) -> list:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _open(driver, url):
    driver.get("about:blank")
    driver.get(url)
    _wait(driver, lambda d: d.execute_script("return document.querySelectorAll('#latent-rows tr').length") > 0)


def _latent_loaded(driver, latent):
    return _wait(driver, lambda d: d.find_elements("css selector", f".latent[data-latent='{latent}']"))


def test_index_loads_without_console_errors(browser, served, site):
    _open(browser, served)
    rows = browser.find_elements("css selector", "#latent-rows tr")
    assert len(rows) == 64 and rows[0].get_attribute("data-latent") == "0"
    assert "of 64" in browser.find_element("id", "filter-count").text
    # the summary column shows token texts once the vocabulary is in (not placeholders "<id>")
    _wait(browser, lambda d: d.execute_script(
        "const c = [...document.querySelectorAll('#latent-rows .tokchip')];"
        "return c.length > 0 && c.every(x => !/^<\\d+>$/.test(x.textContent));"))
    # sort by frequency, then filter the dead latents
    browser.find_element("css selector", "th[data-sort=freq]").click()
    first = int(browser.find_element("css selector", "#latent-rows tr").get_attribute("data-latent"))
    index = read_data(site[0] / "data" / read_data(site[0] / "data" / "meta.js")["saes"][0]["key"] / "index.js")
    assert index["count"][first] == max(index["count"])
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "alive-filter")).select_by_value("dead")
    dead = [int(r.get_attribute("data-latent")) for r in browser.find_elements("css selector", "#latent-rows tr")]
    assert dead and all(index["count"][i] == 0 for i in dead) and 5 in dead
    assert _errors(browser) == []


def test_search_by_id_and_by_token(browser, served, tiny):
    _, tokens, dense = stream_reference(tiny, 512)
    _open(browser, served)
    search = browser.find_element("id", "search")
    search.send_keys("17")
    hit = _wait(browser, lambda d: d.find_elements("css selector", "#search-results a[data-latent]"))
    assert [h.get_attribute("data-latent") for h in hit] == ["17"]
    search.clear()
    search.send_keys("999")
    _wait(browser, lambda d: "No latent 999" in d.find_element("id", "search-results").text)
    # by token: the token " the" (typed as "the"), whose latents Python ranks by largest activation on it
    the_id = tiny["tokenizer"].convert_tokens_to_ids("Ġthe")
    assert tiny["tokenizer"].convert_ids_to_tokens(the_id) == "Ġthe"
    on_the_id = dense[tokens == the_id].amax(0)
    expected = sorted((i for i in range(64) if on_the_id[i] > 0), key=lambda i: -float(on_the_id[i]))[:16]
    assert expected
    search.clear()
    search.send_keys("the")
    chip = _wait(browser, lambda d: d.find_elements("css selector", f"#search-results button.chip[data-token='{the_id}']"))
    chip[0].click()
    _wait(browser, lambda d: "selected" in d.find_element(
        "css selector", f"#search-results button.chip[data-token='{the_id}']").get_attribute("class"))
    hits = _wait(browser, lambda d: d.find_elements("css selector", "#token-hits a[data-latent]"))
    assert [int(h.get_attribute("data-latent")) for h in hits] == expected
    hits[0].click()
    _latent_loaded(browser, expected[0])
    assert browser.current_url.endswith(f"#latent={expected[0]}")
    assert _errors(browser) == []


def test_latent_panel_shows_the_top_context_python_computed(browser, served, tiny, tmp_path):
    _, tokens, dense = stream_reference(tiny, 512)
    counts = (dense > 0).sum(0)
    latent = int(torch.argsort(counts, descending=True)[3])
    value, position = dense_top(dense, latent, 1)[0]
    ids, acts = window(tokens, dense, position, latent, 16, 8, 3)
    _open(browser, served + f"#latent={latent}")
    panel = _latent_loaded(browser, latent)[0]
    first = panel.find_element("css selector", "[data-card=top] .ctx")
    assert int(first.get_attribute("data-position")) == position
    assert float(first.find_element("css selector", ".v").text) == pytest.approx(value, rel=4e-3)  # 3 digits
    spans = first.find_elements("css selector", ".tok")
    shown = [int(re.search(r"  id (\d+)  ", s.get_attribute("title")).group(1)) for s in spans]
    assert shown == [i for i in ids if i != EMPTY_TOKEN]
    centre = first.find_element("css selector", ".tok.centre")
    assert float(centre.get_attribute("data-act")) == pytest.approx(value, rel=1e-3)
    shown_acts = [float(s.get_attribute("data-act")) for s in spans]
    assert shown_acts == pytest.approx([a for a, i in zip(acts, ids) if i != EMPTY_TOKEN], rel=1e-3, abs=1e-6)
    for card in ("activation", "logit", "samples", "nearest"):
        assert panel.find_elements("css selector", f"[data-card={card}]"), card
    assert len(panel.find_elements("css selector", "[data-card=top] .ctx")) == min(20, int(counts[latent]))
    shot = tmp_path / "latent.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    keep = os.environ.get("FASTSAE_DASHBOARD_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "test_latent.png")
    assert _errors(browser) == []


def test_malicious_tokens_render_as_text(browser, served, tiny):
    _, tokens, dense = stream_reference(tiny, 512)
    tokenizer = tiny["tokenizer"]
    script, amp = tokenizer.convert_tokens_to_ids(SCRIPT_TOKEN), tokenizer.convert_tokens_to_ids(AMP_TOKEN)
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    latent = None
    for candidate in torch.argsort((dense > 0).sum(0), descending=True).tolist():
        shown = set()
        for _, position in dense_top(dense, candidate, 20):
            shown |= set(window(tokens, dense, position, candidate, 16, 8, 3)[0])
        if {script, amp, newline} <= shown:
            latent = candidate
            break
    assert latent is not None, "no latent shows all three tokens in its top contexts"
    _open(browser, served + f"#latent={latent}")
    panel = _latent_loaded(browser, latent)[0]
    texts = [s.get_attribute("textContent") for s in panel.find_elements("css selector", "[data-card=top] .tok")]
    assert SCRIPT_TOKEN in texts and AMP_TOKEN in texts and "\u21b5" in texts  # ↵ for the newline
    inner = browser.execute_script("return document.querySelector('[data-card=top] .contexts').innerHTML")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in inner and "&amp;amp;" in inner
    assert browser.execute_script("return [...document.scripts].every(s => s.src && !s.text)")
    assert browser.execute_script("return document.querySelectorAll('.contexts script').length") == 0
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert _errors(browser) == []


def test_url_addresses_latents_and_out_of_range_ids_say_so(browser, served):
    _open(browser, served + "#latent=64")
    _wait(browser, lambda d: "out of range" in d.find_element("id", "latent-view").text)
    assert "64 latents (ids 0\u201363)" in browser.find_element("id", "latent-view").text
    browser.get(served + "#latent=abc")
    _wait(browser, lambda d: "not a latent id" in d.find_element("id", "latent-view").text)
    browser.get(served + "#latent=12")
    _latent_loaded(browser, 12)
    browser.find_element("css selector", ".latent-head .nav a[title='next latent']").click()
    _latent_loaded(browser, 13)
    assert _errors(browser) == []


def test_opens_from_disk(browser, site):
    out, _ = site
    _open(browser, (out / "index.html").resolve().as_uri() + "#latent=3")
    panel = _latent_loaded(browser, 3)[0]
    assert panel.find_elements("css selector", "[data-card=logit] .tokchip")
    assert _errors(browser) == []


def test_compare_links_open_the_other_sae(browser, tiny, tmp_path):
    other = calibrated_sae(tiny["model"], tiny["config"], n_latents=40)
    with torch.no_grad():
        other.W_dec[3] = tiny["sae"].W_dec[9] * 2  # latent 3 of the other SAE is latent 9's direction
    other_dir = other.save_pretrained(tmp_path / "other")
    out = tmp_path / "dash"
    build_dashboard(tiny["spec"], out, compare=f"{other_dir}@{HOOK}", model=str(tiny["model"]),
                    config=str(tiny["config"]), n_tokens=256, device="cpu", log=None)
    second = read_data(out / "data" / "meta.js")["saes"][1]
    assert read_data(out / "data" / second["key"] / "index.js")["count"][3] > 0
    _open(browser, (out / "index.html").resolve().as_uri() + "#latent=9")
    panel = _latent_loaded(browser, 9)[0]
    link = panel.find_element("css selector", f"[data-card=nearest] a[data-sae='{second['key']}']")
    assert link.get_attribute("data-latent") == "3"
    link.click()
    panel = _latent_loaded(browser, 3)[0]
    assert second["label"] in panel.find_element("css selector", ".latent-head").text
    assert browser.current_url.endswith(f"#sae={second['key']}&latent=3")
    assert int(browser.find_element("css selector", "#latent-rows tr").get_attribute("data-latent")) == 0
    assert len(browser.find_elements("css selector", "#latent-rows tr")) == 40  # the other SAE's index
    assert _errors(browser) == []



MATRYOSHKA_GROUPS = [{"label": "prefix 1", "first": 0, "end": 16}, {"label": "prefix 2", "first": 16, "end": 40},
                     {"label": "prefix 3", "first": 40, "end": 64}]


@pytest.fixture(scope="module")
def matryoshka_site(tiny, tmp_path_factory):
    """A dashboard of a Matryoshka SAE (prefixes of 16 and 40 of its 64 latents) beside the ReLU one."""
    root = tmp_path_factory.mktemp("matryoshka_dashboard")
    relu = tiny["sae"]
    sae = E2ESAE(relu.d_in, relu.n_latents, "matryoshka_batchtopk", k=4, widths=[16, 40],
                 metadata={"hook": HOOK}).eval()
    with torch.no_grad():  # the ReLU SAE's weights; inference threshold 0: the same code
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(relu, name))
    out = root / "dash"
    build_dashboard(f"{sae.save_pretrained(root / 'matryoshka')}@{HOOK}", out, compare=tiny["spec"],
                    model=str(tiny["model"]), config=str(tiny["config"]), n_tokens=256, device="cpu", log=None)
    return out


def test_matryoshka_groups_are_in_the_site_files(matryoshka_site):
    """Each latent's group (the first nested prefix that holds it) reaches meta.js and the saved
    statistics; an SAE without groups has none."""
    first, second = read_data(matryoshka_site / "data" / "meta.js")["saes"]
    assert first["groups"] == MATRYOSHKA_GROUPS and second["groups"] is None
    saved = json.loads((matryoshka_site / "latent_stats" / first["key"] / "latent_stats.json").read_text())
    assert saved["metadata"]["latent_groups"] == MATRYOSHKA_GROUPS


def test_matryoshka_latents_show_their_prefix(browser, matryoshka_site):
    """The index's prefix column and the latent's panel show the group; the ReLU SAE beside it
    shows neither."""
    index = (matryoshka_site / "index.html").resolve().as_uri()
    second = read_data(matryoshka_site / "data" / "meta.js")["saes"][1]
    _open(browser, index + "#latent=20")
    panel = _latent_loaded(browser, 20)[0]
    field = panel.find_element("css selector", "[data-field=group]")
    assert field.find_element("css selector", "b").text == "prefix 2"
    assert "in every nested prefix of 40 latents or more" in field.text
    assert browser.find_element("id", "group-head").is_displayed()
    cells = browser.find_elements("css selector", "#latent-rows td.group")
    assert [cells[i].text for i in (0, 16, 63)] == ["prefix 1", "prefix 2", "prefix 3"]
    browser.get(index + f"#sae={second['key']}&latent=3")
    panel = _latent_loaded(browser, 3)[0]
    _wait(browser, lambda d: not d.find_elements("css selector", "#latent-rows td.group"))
    assert not browser.find_element("id", "group-head").is_displayed()
    assert not panel.find_elements("css selector", "[data-field=group]")
    assert _errors(browser) == []
