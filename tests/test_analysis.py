"""fastsae.analysis: each statistic against a direct dense computation on small SAEs, the blocked
similarities against the dense n x n ones, streaming equal to one batch, no N x n_latents or n x n
tensor, held-out activation streams, the paper's pair rules, and `fastsae analyze` end to end."""

import json
import math

import numpy as np
import pytest
import torch

import fastsae.ops.checks as checks
from fastsae import E2ESAE, SparseCode
from fastsae.analysis import (ActivationStream, AnalysisError, LatentStats, TokenBatches, collect_latent_stats,
                              max_cosine_similarity, nearest_latents, sae_fingerprint)
from fastsae.analysis.latent_stats import BIN_EDGES, N_BINS
from fastsae.analysis.similarity import (bootstrap_mean_ci, bootstrap_mean_difference_ci, max_error_bound,
                                         unit_rows)
from fastsae.analysis.umap_regions import exclusive_regions, nearest_neighbours
from fastsae.train import losses
from tests.helpers_dispatch import AllocationRecorder


def sparse_sae(activation="relu", d=16, n=96, k=None, seed=0, shift=-1.0):
    """A small SAE whose ReLU code is sparse (a negative encoder bias), every 7th latent dead."""
    torch.manual_seed(seed)
    sae = E2ESAE(d, n, activation, k)
    with torch.no_grad():
        sae.b_enc.add_(shift)
        sae.b_enc[::7] = -1e3
    return sae


def dense_code(sae, x):
    code = sae.encode(x)
    return code.to_dense(sae.n_latents) if isinstance(code, SparseCode) else code


def dense_stats(dense: torch.Tensor):
    """The statistics straight from a dense [N, n] code (the spec LatentStats must match)."""
    dense = dense.reshape(-1, dense.shape[-1]).double()
    active = dense > 0
    count = active.sum(0)
    hist = torch.zeros(dense.shape[1], N_BINS, dtype=torch.int64)
    for j in range(dense.shape[1]):
        values = dense[active[:, j], j]
        bins = torch.bucketize(values, BIN_EDGES, right=True)
        hist[j] = torch.bincount(bins, minlength=N_BINS)
    return count, dense.sum(0), dense.max(0).values.clamp_min(0), hist


# ------------------------------------------------------------------------------ latent statistics

@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 5)])
def test_latent_stats_match_the_dense_code(activation, k):
    sae = sparse_sae(activation, k=k)
    x = torch.randn(6, 40, 16) * 2
    stats = LatentStats(sae.n_latents).update(sae.encode_sparse(x))
    count, total, top, hist = dense_stats(dense_code(sae, x))
    assert stats.n_tokens == 240
    assert torch.equal(stats.count, count)
    assert torch.equal(stats.alive, count > 0) and 0 < stats.n_alive < sae.n_latents  # some dead, some alive
    torch.testing.assert_close(stats.activation_sum, total, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.activation_max, top)
    assert torch.equal(stats.histogram, hist)
    assert torch.equal(stats.histogram.sum(1), count)
    torch.testing.assert_close(stats.frequency, count.double() / 240)
    firing = count > 0
    torch.testing.assert_close(stats.mean_when_firing[firing], total[firing] / count[firing])
    assert stats.mean_when_firing[~firing].isnan().all()
    torch.testing.assert_close(stats.mean_activation, total / 240)
    # the mean L0 the trainer reports (the SAE's training pass), from the same code
    assert float(stats.count.sum()) / stats.n_tokens == pytest.approx(float(sae.training_forward(x).l0), rel=1e-6)


def test_histogram_bins_are_the_documented_log_spaced_ones():
    stats = LatentStats(3)
    values = torch.tensor([[5e-4, 1e-3, 0.5], [1e4, 2e4, 0.0]])
    stats.update(SparseCode(values, torch.tensor([[0, 0, 1], [2, 2, 1]])))
    assert stats.histogram[0, 0] == 1 and stats.histogram[0, 1] == 1  # below 1e-3; [1e-3, 1e-3 * 10^(1/8))
    assert stats.histogram[2, N_BINS - 1] == 2  # at or above 1e4
    assert stats.count.tolist() == [2, 1, 2]  # the 0 entry is padding, not a firing
    edges = LatentStats.bin_edges()
    assert len(edges) == N_BINS + 1 and edges[0] == -math.inf and edges[-1] == math.inf


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 3)])
def test_streaming_in_many_batches_equals_one_batch_and_merge(activation, k):
    sae = sparse_sae(activation, k=k, seed=1)
    x = torch.randn(300, 16) * 2
    code = sae.encode_sparse(x)
    whole = LatentStats(sae.n_latents).update(code)
    pieces = LatentStats(sae.n_latents)
    for rows in torch.split(torch.arange(300), [1, 7, 50, 120, 122]):  # uneven batches
        values, indices = code.values[rows], code.indices[rows]
        width = max(1, int((values > 0).sum(-1).max()))  # each batch padded to its own width, as encode_sparse does
        pieces.update(SparseCode(values[:, :width], indices[:, :width]))
    halves = [LatentStats(sae.n_latents).update(SparseCode(code.values[r], code.indices[r]))
              for r in (slice(0, 133), slice(133, None))]
    merged = halves[0].merge(halves[1])
    for other in (pieces, merged):
        assert other.n_tokens == whole.n_tokens == 300
        assert torch.equal(other.count, whole.count)
        assert torch.equal(other.activation_max, whole.activation_max)
        assert torch.equal(other.histogram, whole.histogram)
        torch.testing.assert_close(other.activation_sum, whole.activation_sum, rtol=1e-13, atol=1e-13)
    # encoding the batches one by one changes the encoder GEMM's fp32 rounding, nothing more
    streamed = LatentStats(sae.n_latents)
    for chunk in torch.split(x, [1, 7, 50, 120, 122]):
        streamed.update(sae.encode_sparse(chunk))
    assert torch.equal(streamed.count, whole.count)
    torch.testing.assert_close(streamed.activation_sum, whole.activation_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed.activation_max, whole.activation_max, rtol=1e-6, atol=1e-6)


def test_save_load_roundtrip_and_refusals(tmp_path):
    sae = sparse_sae()
    stats = LatentStats(sae.n_latents).update(sae.encode_sparse(torch.randn(50, 16) * 2))
    stats.save(tmp_path / "s", metadata={"hook": "blocks.0.hook_resid_pre", "sae": sae_fingerprint(sae)})
    loaded = LatentStats.load(tmp_path / "s")
    assert loaded.n_tokens == 50 and loaded.metadata["sae"] == sae_fingerprint(sae)
    for name in ("count", "activation_sum", "activation_max", "histogram"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["latent_stats.json", "latent_stats.safetensors"]
    # the JSON of one save beside the tensors of another is refused
    stats.update(sae.encode_sparse(torch.randn(5, 16)))
    stats.save(tmp_path / "t")
    (tmp_path / "t" / "latent_stats.json").write_text((tmp_path / "s" / "latent_stats.json").read_text())
    with pytest.raises(ValueError, match="different saves"):
        LatentStats.load(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="not saved by LatentStats.save"):
        LatentStats.load(tmp_path)
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(LatentStats(3))
    other = sparse_sae(seed=5)
    assert sae_fingerprint(other) != sae_fingerprint(sae) and sae_fingerprint(sae) == sae_fingerprint(sparse_sae())


# ------------------------------------------------------------------------------ similarities

def dense_max(a, b=None):
    A = unit_rows(a.double())
    sims = A @ (A if b is None else unit_rows(b.double())).T
    if b is None:
        sims.fill_diagonal_(-math.inf)
    return sims


@pytest.mark.parametrize("n,block", [(1, 4), (2, 1), (37, 8), (64, 64), (100, 33), (100, 1000)])
def test_blocked_max_cosine_equals_the_dense_matrix(n, block):
    a = torch.randn(max(n, 2), 12)
    b = torch.randn(n + 5, 12)
    sims = dense_max(a)
    values, ids = max_cosine_similarity(a, block=block)
    torch.testing.assert_close(values.double(), sims.max(1).values, rtol=0, atol=1e-6)
    assert torch.equal(ids, sims.max(1).indices)
    cross = dense_max(a, b)
    values, ids = max_cosine_similarity(a, b, block=block)
    torch.testing.assert_close(values.double(), cross.max(1).values, rtol=0, atol=1e-6)
    assert torch.equal(ids, cross.max(1).indices)


@pytest.mark.parametrize("block", [5, 16, 200])
def test_nearest_latents_top_k_equals_the_dense_topk(block):
    a = torch.randn(70, 9)
    sims = dense_max(a)
    values, ids = nearest_latents(a, k=4, block=block)
    top = sims.topk(4, dim=1)
    torch.testing.assert_close(values.double(), top.values, rtol=0, atol=1e-6)
    assert torch.equal(ids, top.indices)
    values, ids = nearest_latents(a[:3], k=5)  # fewer candidates than k: -inf and id -1
    assert torch.isinf(values[:, 2:]).all() and (ids[:, 2:] == -1).all()


def test_duplicated_and_opposite_directions():
    a = torch.randn(10, 6)
    a[7] = 3 * a[2]  # the same direction, another length: cosine 1
    a[4] = -a[1]
    values, ids = max_cosine_similarity(a)
    assert values[2] == pytest.approx(1.0, abs=1e-6) and ids[2] == 7 and ids[7] == 2
    assert ids[1] != 4  # an opposite direction is the least similar, not the most


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 explicit mantissa bits) by truncation, the worst case the bound allows for."""
    bits = x.contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("d", [64, 768])
def test_reduced_precision_max_stays_within_the_documented_bound(d):
    torch.manual_seed(d)
    a = torch.randn(300, d)
    a[:60] += 2 * torch.randn(1, d)  # a cluster: large maxima, where rounding matters most
    exact = dense_max(a).max(1).values
    bf16, _ = max_cosine_similarity(a, precision="bf16", block=128)
    assert (bf16.double() - exact).abs().max() <= max_error_bound("bf16", d)
    assert (bf16.double() - exact).abs().max() > 1e-5  # bf16 really ran
    # TF32 exists only on CUDA: emulate its operand rounding on the unit rows, then fp32 GEMMs
    unit = unit_rows(a)
    sims = tf32_round(unit) @ tf32_round(unit).T
    sims.fill_diagonal_(-math.inf)
    assert (sims.max(1).values.double() - exact).abs().max() <= max_error_bound("tf32", d)
    fp32, _ = max_cosine_similarity(a, precision="fp32")
    assert (fp32.double() - exact).abs().max() <= max_error_bound("fp32", d)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp32"])
def test_reduced_precision_on_cuda_within_the_bound(precision):
    a = torch.randn(3000, 768, device="cuda")
    a[:300] += 2 * torch.randn(1, 768, device="cuda")
    exact = dense_max(a.cpu()).max(1).values
    values, _ = max_cosine_similarity(a, precision=precision, block=1024)
    assert (values.cpu().double() - exact).abs().max() <= max_error_bound(precision, 768)


def test_similarity_input_errors():
    with pytest.raises(ValueError, match="at least 2 directions"):
        max_cosine_similarity(torch.randn(1, 4))
    with pytest.raises(ValueError, match="b must be"):
        max_cosine_similarity(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="precision must be one of"):
        max_cosine_similarity(torch.randn(3, 4), precision="fp8")


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    sample = rng.normal(0.4, 0.1, size=4000)
    ci = bootstrap_mean_ci(sample, seed=1)
    half = 1.96 * 0.1 / math.sqrt(4000)  # the normal-theory half width
    assert ci["low"] < sample.mean() < ci["high"]
    assert (ci["high"] - ci["low"]) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_mean_ci(sample, seed=1) == ci  # seeded
    other = rng.normal(0.35, 0.1, size=3000)
    diff = bootstrap_mean_difference_ci(sample, other, seed=2)
    assert diff["difference"] == pytest.approx(sample.mean() - other.mean())
    assert diff["low"] < diff["difference"] < diff["high"] and diff["low"] > 0.04


# ------------------------------------------------------------------------------ memory

def test_no_tokens_x_latents_or_latents_x_latents_tensor(monkeypatch):
    """At these sizes a dense code is 131,072 elements and a similarity matrix 65,536: every temporary
    must stay below both (the chunk budget 1,024, a block 32 x 32, the histogram 256 x 58, the
    padded code 512 x its width)."""
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 1024)
    n_tokens, n_latents = 512, 256
    sae = sparse_sae("relu", d=16, n=n_latents, shift=-1.0)
    x = torch.randn(n_tokens, 16)
    recorder = AllocationRecorder()
    with recorder:
        stats = LatentStats(n_latents).update(sae.encode_sparse(x))
        values, ids = max_cosine_similarity(sae.W_dec, block=32)
        nearest_latents(sae.W_dec, sae.W_dec[:100] * 2, k=3, block=32)
    largest = max(torch.Size(s).numel() for s in recorder.shapes)
    assert stats.n_alive > 0 and len(values) == n_latents
    assert int(stats.count.max()) < n_tokens and sae.encode_sparse(x).values.shape[1] < 64  # a sparse code
    limit = min(n_tokens * n_latents, n_latents * n_latents)
    assert largest < limit, f"a temporary of {largest} elements (dense code {n_tokens * n_latents}, matrix {n_latents ** 2})"
    # the recorder sees the dense forms when they are built
    with recorder:
        dense_code(sae, x)
        dense_max(sae.W_dec.detach())
    assert max(torch.Size(s).numel() for s in recorder.shapes) >= limit


# ------------------------------------------------------------------------------ streams

def test_token_batches_cut_the_last_batch_and_stop_at_the_wrap(lm):
    from fastsae.train.data import ArrayTokenStream

    batches = [torch.randint(0, 100, (4, 16)) for _ in range(5)]
    taken = TokenBatches(batches, 100)
    got = list(taken)
    assert [b.shape[0] for b in got] == [4, 3] and taken.tokens == 112 and not taken.ran_out
    assert torch.equal(got[1], batches[1][:3])
    short = TokenBatches(batches[:2], 1000)
    with pytest.warns(UserWarning, match="ran out after 128 tokens"):
        assert len(list(short)) == 2
    assert short.ran_out
    # a TokenStream loops forever: the pass ends where it would read a window twice
    stream = ArrayTokenStream(np.arange(10 * 16) % 50, context_length=16, batch_size=4, shuffle=False)
    taken = TokenBatches(stream, 10_000)
    with pytest.warns(UserWarning, match="ran out"):
        got = list(taken)
    assert len(got) == 2 and taken.tokens == 128  # the third batch straddles the wrap
    with pytest.raises(AnalysisError, match="n_tokens must be a positive int"):
        TokenBatches(batches, 0)
    with pytest.raises(AnalysisError, match="no full batch"):
        list(TokenBatches([], 10))


def test_activation_stream_gives_the_clean_activations(lm):
    hooks = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"]
    batches = [torch.randint(0, 200, (3, 12)) for _ in range(3)]
    stream = ActivationStream(lm, batches, hooks, n_tokens=60)
    seen = list(stream)
    assert stream.tokens == 60 and [b.tokens.shape for b in seen] == [(3, 12), (2, 12)]
    for batch, tokens in zip(seen, [batches[0], batches[1][:2]]):
        expected = lm.activations(tokens, hooks)
        for hook in hooks:
            assert torch.equal(batch.activations[hook], expected[hook])
            assert batch.activations[hook].shape == (*tokens.shape, lm.d_model)
    sae = sparse_sae(d=lm.d_model, n=64, shift=0.0)
    stats = collect_latent_stats(ActivationStream(lm, batches, hooks[:1], 10_000), {"s": (hooks[0], sae)})["s"]
    x = torch.cat([lm.activations(t, hooks[:1])[hooks[0]] for t in batches])
    assert stats.n_tokens == 108 and torch.equal(stats.count, (dense_code(sae, x) > 0).reshape(-1, 64).sum(0))
    with pytest.raises(AnalysisError, match="blocks.9"):
        ActivationStream(lm, batches, ["blocks.9.hook_resid_pre"], 10)


# ------------------------------------------------------------------------------ UMAP regions

def test_exclusive_regions_find_a_cluster_only_one_dictionary_has():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(400, 2))
    owner = rng.integers(0, 2, size=400)  # a and b mixed at random in one blob
    only_a = rng.normal(size=(30, 2)) * 0.2 + [8, 8]  # a cluster of a's alone, far away
    a = np.concatenate([shared[owner == 0], only_a])
    b = shared[owner == 1]
    regions = exclusive_regions(np.concatenate([a, b]), len(a))
    assert len(regions) == 1
    region = regions[0]
    assert region["owner"] == 0 and region["members"] == list(range(len(a) - 30, len(a)))
    neighbours = nearest_neighbours(np.concatenate([a, b]), 3)
    assert neighbours.shape == (len(a) + len(b), 3)


# ------------------------------------------------------------------------------ explained variance

def test_explained_variance_variants_against_the_paper_formula():
    x = torch.randn(4, 10, 8) * 3 + 1
    x_hat = 0.5 * x + 0.3 * torch.randn(4, 10, 8)

    def paper(pred, target, layer_norm=False):  # e2e_sae.losses.calc_explained_variance, written out
        if layer_norm:
            pred = (pred - pred.mean(-1, keepdim=True)) / ((pred - pred.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            target = (target - target.mean(-1, keepdim=True)) / ((target - target.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        l2 = (pred - target).pow(2).sum(-1)
        total = (target - target.mean(dim=(0, 1))).pow(2).sum(-1)
        return (1 - l2 / total).mean()

    torch.testing.assert_close(losses.explained_variance(x, x_hat), paper(x_hat, x))
    torch.testing.assert_close(losses.explained_variance_out_to_in(x, x_hat), paper(x, x_hat))
    torch.testing.assert_close(losses.explained_variance_ln(x, x_hat), paper(x_hat, x, layer_norm=True))
    torch.testing.assert_close(losses.explained_variance_out_to_in(x, x_hat, layer_norm=True),
                               paper(x, x_hat, layer_norm=True))
    # a shrunken output: the output-target EV divides the same error by the output's smaller spread
    assert float(losses.explained_variance_out_to_in(x, x_hat)) < float(losses.explained_variance(x, x_hat))
    # layer norm ignores each token's scale
    torch.testing.assert_close(losses.explained_variance_ln(x, 0.5 * x), torch.tensor(1.0), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ pair rules

def _target(label, objective, coeff, seed, ce, l0, hook="blocks.1.hook_resid_pre"):
    from fastsae.analysis.stream import SAETarget

    record = {"metrics": {"ce_increase": ce, f"l0/{hook}": l0, "l0": l0}}
    return SAETarget(label, hook, None, label, None, objective, coeff, seed, 1, record)


def test_matched_sets_follow_the_papers_two_rules():
    from fastsae.analysis.pairs import cross_seed_pairs, cross_type_pairs, matched_sets

    targets = [_target("l1", "local", 1, 0, ce=0.15, l0=70), _target("l2", "local", 2, 0, ce=0.39, l0=31),
               _target("e1", "e2e", 0.75, 0, ce=0.081, l0=73), _target("e2", "e2e", 3, 0, ce=0.185, l0=32),
               _target("d1", "e2e+ds", 3, 0, ce=0.08, l0=69), _target("d2", "e2e+ds", 6, 0, ce=0.17, l0=38),
               _target("l1b", "local", 1, 1, ce=0.16, l0=71), _target("e1b", "e2e", 0.75, 1, ce=0.2, l0=10)]
    ce = matched_sets(targets, "ce")[0]
    assert ce["targets"] == {"local": "l1", "e2e": "e2", "e2e+ds": "d2"}  # 0.15, 0.185, 0.17: the tightest
    assert ce["spread_log_ratio"] == pytest.approx(math.log(0.185 / 0.15))
    l0 = matched_sets(targets, "l0")[0]
    assert l0["targets"] == {"local": "l1", "e2e": "e1", "e2e+ds": "d1"}  # 70, 73, 69
    pairs = cross_type_pairs([ce])
    assert [(p.a, p.b) for p in pairs] == [("e2", "l1"), ("d2", "l1"), ("e2", "d2")]
    seeds = cross_seed_pairs(targets, ["l1", "e1", "d1"])
    assert [(p.a, p.b) for p in seeds] == [("l1", "l1b"), ("e1", "e1b")]
    assert matched_sets([t for t in targets if t.objective == "local"], "ce") == []  # one objective: nothing to match


# ------------------------------------------------------------------------------ `fastsae analyze`

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, lm, model_dir):
    """local, e2e and e2e+ds runs at two seeds on the tiny model (module lm: 3 layers, d_model 32)."""
    from fastsae.train.sweep import run_sweep, sweep_points
    from helpers_models import TINY_TEXT

    root = tmp_path_factory.mktemp("analysis_sweep")
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT * 60)
    overrides = [f"model.name={model_dir}", "data.source=text", f"data.path={corpus}", "data.eval_fraction=0.3",
                 "data.context_length=16", "optim.batch_size=4", "optim.n_tokens=256", "optim.warmup_samples=4",
                 "eval.n_tokens=64", "eval.batch_size=4", "saes.n_latents=48", "log.progress=false",
                 "loss.downstream_hooks=[blocks.2.hook_resid_pre]", "device=cpu"]
    points = sweep_points(root / "sweep", "embedded", ["local", "e2e", "e2e+ds"],
                          {"local": [0.5, 2.0], "e2e": [0.5], "e2e+ds": [1.0]}, seeds=[0, 1])
    run_sweep(points, overrides, model=lm, log=lambda line: None)
    return root / "sweep"


def test_analyze_a_sweep_writes_every_output_and_matches_direct_computation(tiny_sweep, lm, tmp_path, capsys):
    from safetensors.torch import load_file

    from fastsae import load_run
    from fastsae.analysis.stream import held_out_batches, load_targets
    from fastsae.cli import main

    out = tmp_path / "analysis"
    assert main(["analyze", str(tiny_sweep), "--out", str(out), "--tokens", "200", "--no-umap"]) == 0
    names = sorted(p.name for p in out.iterdir())
    for stem in ("feature_density", "within_sae_similarity", "within_sae_similarity_vs_l0", "cross_type_similarity",
                 "cross_seed_similarity", "activation_geometry"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names, stem
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert {"analysis.json", "analysis.md", "similarities.safetensors", "latent_stats"} <= set(names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".analysis")]  # no staging left
    result = json.loads((out / "analysis.json").read_text())
    assert len(result["saes"]) == 8 and result["tokens"] == 208  # 200 asked: 13 windows of 16
    assert {g["rule"] for g in result["matched"]["ce"] + result["matched"]["l0"]} == {"ce", "l0"}
    assert len(result["cross_type"]) == 6 and len(result["cross_seed"]) == 3
    assert "## Cross-seed similarity" in (out / "analysis.md").read_text()

    # one SAE recomputed directly: dense code, dense similarity matrix, its output and the spliced run
    label = "e2e-s0.5-seed0"
    hook = "blocks.1.hook_resid_pre"
    sae = load_run(tiny_sweep / label)[hook]
    config = load_targets([tiny_sweep / label]).config
    tokens = torch.cat(list(TokenBatches(held_out_batches(lm, config), 200)))
    x = lm.activations(tokens, [hook])[hook]
    dense = sae.encode(x)
    alive = (dense > 0).reshape(-1, sae.n_latents).any(0)
    stats = LatentStats.load(out / "latent_stats" / label)
    assert torch.equal(stats.alive, alive) and stats.n_tokens == 208
    assert torch.equal(stats.count, (dense > 0).reshape(-1, sae.n_latents).sum(0))
    arrays = load_file(str(out / "similarities.safetensors"))
    assert torch.equal(arrays[f"alive_ids/{label}"], alive.nonzero().squeeze(1))
    sims = dense_max(sae.W_dec[alive].detach())
    torch.testing.assert_close(arrays[f"within/{label}/max_cosine"].double(), sims.max(1).values, rtol=0, atol=1e-6)
    entry = result["saes"][label]
    assert entry["within_similarity"]["mean"] == pytest.approx(float(sims.max(1).values.mean()), abs=1e-6)
    x_hat = sae(x).detach()
    io = entry["activation_geometry"]["sae_output_vs_input"]
    ratio = x_hat.norm(dim=-1) / x.norm(dim=-1)
    assert io["norm_ratio"]["mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert io["norm_ratio"]["pos0"] == pytest.approx(float(ratio[:, 0].mean()), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1)
    assert io["cosine"]["pos_gt_0"] == pytest.approx(float(cos[:, 1:].mean()), rel=1e-5)
    # EVs as the trainer's eval: per batch (4 rows; here 4, 4, 4, 1), then token-weighted
    for name, fn in (("explained_variance", losses.explained_variance),
                     ("explained_variance_out_to_in_ln", lambda a, b: losses.explained_variance_out_to_in(a, b, True))):
        per_batch = [(float(fn(a, b)), a.shape[:-1].numel()) for a, b in zip(x.split(4), x_hat.split(4))]
        expected = sum(v * n for v, n in per_batch) / sum(n for _, n in per_batch)
        assert io["metrics"][name] == pytest.approx(expected, rel=1e-4)
    final = "blocks.2.hook_resid_post"
    _, clean = lm.clean_run(tokens, [final])
    _, spliced = lm.spliced_run(tokens, {hook: lambda a: sae(a)}, capture_hooks=[final])
    drift = entry["activation_geometry"]["downstream"][final]
    cos = torch.nn.functional.cosine_similarity(clean[final], spliced[final].detach(), dim=-1)
    assert drift["cosine"]["mean"] == pytest.approx(float(cos.mean()), rel=1e-4)
    assert set(entry["activation_geometry"]["downstream"]) == {"blocks.2.hook_resid_pre", final}
    # a cross-type pair, recomputed
    pair = result["cross_type"][0]
    other = load_run(tiny_sweep / pair["b"])[hook]
    alive_b = LatentStats.load(out / "latent_stats" / pair["b"]).alive
    first = load_run(tiny_sweep / pair["a"])[hook]
    alive_a = LatentStats.load(out / "latent_stats" / pair["a"]).alive
    cross = dense_max(first.W_dec[alive_a].detach(), other.W_dec[alive_b].detach())
    assert pair["mean"] == pytest.approx(float(cross.max(1).values.mean()), abs=1e-6)


def test_analyze_bad_input_is_one_line_and_writes_nothing(tiny_sweep, lm, tmp_path, capsys, monkeypatch):
    import shutil
    import sys

    from fastsae import load_run
    from fastsae.cli import main

    hook = "blocks.1.hook_resid_pre"
    out = tmp_path / "out"

    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err.split("\n")  # (model loading may print progress bars before it)
        assert err[-1] == "" and err[-2].startswith("fastsae analyze: error: ") and message in err[-2], err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    # a sweep run without eval data
    broken = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, broken)
    (broken / "local-s2-seed1" / "eval.json").unlink()
    fails(["analyze", str(broken), "--out", str(out), "--no-umap"], "local-s2-seed1 has no eval.json")
    # an SAE with no alive latent
    sae = load_run(tiny_sweep / "local-s0.5-seed0")[hook]
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    sae.save_pretrained(tmp_path / "dead")
    fails(["analyze", f"{tmp_path / 'dead'}@{hook}", "--out", str(out), "--no-umap", "--tokens", "64",
           "--config", str(tiny_sweep / "local-s0.5-seed0" / "config.yaml")], "has no alive latent")
    # SAEs at different hooks compared
    sae = load_run(tiny_sweep / "local-s0.5-seed0")[hook]
    sae.metadata["hook"] = "blocks.2.hook_resid_pre"
    sae.save_pretrained(tmp_path / "later")
    fails(["analyze", str(tiny_sweep / "e2e-s0.5-seed0"), str(tmp_path / "later"), "--out", str(out), "--no-umap",
           "--pair", "e2e-s0.5-seed0", "later"], "they read different hooks")
    # an SAE of another width than the model's hook
    E2ESAE(16, 32, metadata={"hook": hook}).save_pretrained(tmp_path / "narrow")
    fails(["analyze", str(tiny_sweep / "e2e-s0.5-seed0"), str(tmp_path / "narrow"), "--out", str(out),
           "--no-umap"], "reads d_in=16")
    # a missing optional extra
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap raises ImportError
    fails(["analyze", str(tiny_sweep), "--out", str(out)], "pip install 'fastsae[analysis]'")
    monkeypatch.undo()
    # a failure while drawing leaves an existing output directory as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    from fastsae.analysis import figures

    def broken_figures(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "draw_all", broken_figures)
    with pytest.raises(RuntimeError, match="drawing failed"):
        main(["analyze", str(tiny_sweep / "e2e-s0.5-seed0"), "--out", str(out), "--no-umap", "--tokens", "64"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_analyze_with_umap_reports_regions(tiny_sweep, tmp_path):
    pytest.importorskip("umap")
    from fastsae.analysis import analyze

    out = tmp_path / "a"
    result = analyze([tiny_sweep], out, n_tokens=128, log=lambda line: None)
    assert len(result["umap"]) == 2  # e2e and e2e+ds against local at similar CE increase
    for entry in result["umap"]:
        assert (out / f"umap_{entry['a']}_vs_{entry['b']}.png").is_file()
        for region in entry["regions"]:
            assert region["sae"] in (entry["a"], entry["b"]) and region["size"] == len(region["latents"]) >= 10


def test_analyze_gives_each_matryoshka_prefix_its_alive_latents_and_l0(tiny_sweep, lm, model_dir, tmp_path):
    """A Matryoshka SAE's groups (the first nested prefix that holds each latent) reach analysis.json
    with their alive latents and L0, straight from the dense code, analysis.md, and the saved
    statistics' metadata."""
    from fastsae.analysis import analyze
    from fastsae.analysis.stream import held_out_batches, load_targets

    hook = "blocks.1.hook_resid_pre"
    config = tiny_sweep / "local-s0.5-seed0" / "config.yaml"
    torch.manual_seed(0)
    sae = E2ESAE(lm.d_model, 48, "matryoshka_batchtopk", k=4, widths=[8, 24], metadata={"hook": hook}).eval()
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    assert sae_fingerprint(sae)  # a 0-d buffer (the threshold) hashes too
    out = tmp_path / "out"
    result = analyze([f"{sae.save_pretrained(tmp_path / 'matryoshka')}@{hook}"], out, n_tokens=64, config=str(config),
                     model=str(model_dir), umap=False, log=lambda line: None)
    (label, entry), = result["saes"].items()
    tokens = torch.cat(list(TokenBatches(held_out_batches(lm, load_targets([tiny_sweep / "local-s0.5-seed0"]).config),
                                         64)))
    active = (sae.encode(lm.activations(tokens, [hook])[hook]) > 0).reshape(-1, 48)
    want = [("prefix 1", 0, 8), ("prefix 2", 8, 24), ("prefix 3", 24, 48)]
    assert [(g["label"], g["first"], g["end"]) for g in entry["latent_groups"]] == want
    for group, (_, first, end) in zip(entry["latent_groups"], want):
        assert group["latents"] == end - first and group["alive"] == int(active[:, first:end].any(0).sum())
        assert group["l0"] == pytest.approx(float(active[:, first:end].sum()) / active.shape[0])
    assert 0 < entry["latent_groups"][0]["alive"] and 0 < entry["latent_groups"][2]["alive"] < 24
    assert "## Groups of latents (Matryoshka's nested prefixes)" in (out / "analysis.md").read_text()
    saved = LatentStats.load(out / "latent_stats" / label.replace("/", "__").replace("@", "_at_"))
    assert saved.metadata["latent_groups"] == [{"label": n, "first": a, "end": b} for n, a, b in want]


TRANSCODER_HOOK = "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out"


def _transcoder(lm, seed, skip=True, d_out=None):
    """A TopK skip-transcoder on the tiny model's MLP 1, with a nonzero skip path (the init's is 0)."""
    torch.manual_seed(seed)
    sae = E2ESAE(lm.d_model, 48, "topk", k=4, d_out=d_out, skip=skip, metadata={"hook": TRANSCODER_HOOK}).eval()
    if skip:
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.05)
    return sae


def test_analyze_a_transcoder_reads_in_and_compares_with_out(tiny_sweep, lm, model_dir, tmp_path):
    """A transcoder IN->OUT: its latents fire on the activation at IN, its output is compared with
    the activation at OUT (the MLP's output it replaces), the spliced run replaces OUT, two
    transcoders pair up, and one whose widths do not match the model's hooks is refused by name."""
    from fastsae.analysis import analyze
    from fastsae.analysis.stream import held_out_batches, load_targets

    hook_in, hook_out = TRANSCODER_HOOK.split("->")
    config = tiny_sweep / "local-s0.5-seed0" / "config.yaml"
    a, b = _transcoder(lm, 0), _transcoder(lm, 1)
    specs = [f"{a.save_pretrained(tmp_path / 'a')}", f"{b.save_pretrained(tmp_path / 'b')}"]
    out = tmp_path / "out"
    result = analyze(specs, out, n_tokens=64, config=str(config), model=str(model_dir), umap=False,
                     pairs=[("a", "b")], log=lambda line: None)
    entry = result["saes"]["a"]
    assert entry["hook"] == TRANSCODER_HOOK and entry["d_out"] == lm.d_model
    geometry = entry["activation_geometry"]
    assert geometry["compared_with"] == hook_out
    assert list(geometry["downstream"]) == ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]

    tokens = torch.cat(list(TokenBatches(held_out_batches(lm, load_targets([tiny_sweep / "local-s0.5-seed0"]).config),
                                         64)))
    acts = lm.activations(tokens, [hook_in, hook_out])
    with torch.no_grad():
        x_hat = a(acts[hook_in])
        alive_a, alive_b = ((sae.encode(acts[hook_in]).to_dense(48) > 0).reshape(-1, 48).any(0) for sae in (a, b))
        alive = int(alive_a.sum())
    assert entry["latent_stats"]["alive"] == alive
    metrics = geometry["sae_output_vs_input"]["metrics"]
    assert metrics["mse"] == pytest.approx(float(losses.mse_loss(x_hat, acts[hook_out])), rel=1e-4)
    assert metrics["explained_variance"] == pytest.approx(float(losses.explained_variance(acts[hook_out], x_hat)),
                                                          abs=1e-3)
    # the spliced run: the clean model with MLP 1's output replaced by the transcoder's
    _, spliced = lm.spliced_run(tokens, {hook_out: lambda _: x_hat}, capture_hooks=["blocks.2.hook_resid_pre"])
    _, clean = lm.clean_run(tokens, ["blocks.2.hook_resid_pre"])
    drift = geometry["downstream"]["blocks.2.hook_resid_pre"]["metrics"]["mse"]
    assert drift == pytest.approx(float(losses.mse_loss(spliced["blocks.2.hook_resid_pre"],
                                                        clean["blocks.2.hook_resid_pre"])), rel=1e-4)
    # the pair: the decoder rows [n, d_out] of a's alive latents against b's
    given, = [c for c in result["cross_type"] if c["reason"] == "given"]
    assert (given["a"], given["b"]) == ("a", "b")
    unit_a, unit_b = (torch.nn.functional.normalize(sae.W_dec[alive].detach(), dim=1)
                      for sae, alive in ((a, alive_a), (b, alive_b)))
    cosines = unit_a @ unit_b.T
    assert given["mean"] == pytest.approx(float(cosines.max(1).values.mean()), abs=1e-4)
    assert "the activation at OUT it replaces" in (out / "analysis.md").read_text()

    # widths that do not fit the model's hooks are refused, naming the SAE and the hook
    narrow = _transcoder(lm, 2, skip=False, d_out=16).save_pretrained(tmp_path / "narrow")
    with pytest.raises(AnalysisError, match=r"narrow writes d_out=16, but blocks.1.hook_mlp_out .* 32 wide"):
        analyze([str(narrow)], tmp_path / "out2", n_tokens=64, config=str(config), model=str(model_dir), umap=False,
                log=lambda line: None)
    with pytest.raises(AnalysisError, match="different d_out"):
        analyze([specs[0], str(narrow)], tmp_path / "out3", n_tokens=64, config=str(config), model=str(model_dir),
                umap=False, pairs=[("a", "narrow")], log=lambda line: None)
