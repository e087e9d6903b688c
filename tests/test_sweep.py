"""`fastsae sweep` and `fastsae plot` on a tiny model: the grid's run directories, skip / resume /
evaluate-only, the per-run lock, and the figure, CSV and table from the runs' eval.json."""

import csv
import json

import pytest
import torch

from fastsae.cli import main
from fastsae.model.lm import LanguageModel
from fastsae.plot import (COLUMNS, Point, collect_points, compare_curves, find_runs, latent_panels, plot_runs, read_csv,
                          to_csv, to_markdown)
from fastsae.train import Trainer
from fastsae.train.config import ConfigError
from fastsae.train.metrics import RARE_FREQUENCY, firing_counts
from fastsae.train.sweep import claim, point_config, point_status, run_sweep, sweep_points
from helpers_models import save_tiny_gpt2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sweep")
    model_dir = save_tiny_gpt2(root / "model", n_layer=3, n_embd=32, n_ctx=64)
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. a sparse autoencoder reads the residual. " * 100)
    overrides = [f"model.name={model_dir}", "data.source=text", f"data.path={corpus}", "data.eval_fraction=0.3",
                 "data.context_length=16", "optim.batch_size=4", "optim.n_tokens=192", "optim.warmup_samples=4",
                 "eval.n_tokens=64", "eval.batch_size=4", "saes.n_latents=32", "log.progress=false",
                 "loss.downstream_hooks=[blocks.2.hook_resid_pre]"]
    return LanguageModel.load(str(model_dir)), overrides


def test_grid_names_presets_and_errors(tmp_path):
    points = sweep_points(tmp_path, "embedded", ["local", "e2e+ds"], {"local": [1, 2.5]}, seeds=[0, 3])
    assert [p.name for p in points] == ["local-s1-seed0", "local-s1-seed3", "local-s2.5-seed0", "local-s2.5-seed3",
                                        "e2eds-s0.75-seed0", "e2eds-s0.75-seed3", "e2eds-s1.5-seed0",
                                        "e2eds-s1.5-seed3", "e2eds-s3-seed0", "e2eds-s3-seed3", "e2eds-s6-seed0",
                                        "e2eds-s6-seed3"]
    assert {p.preset for p in points} == {"embedded-local", "embedded-e2e-ds"}
    cfg = point_config(points[2])
    assert (cfg.loss.sparsity_coeff, cfg.seed, cfg.run_dir, cfg.name) == (2.5, 0, str(tmp_path / "local-s2.5-seed0"),
                                                                       "local-s2.5-seed0")
    with pytest.raises(ConfigError, match="objectives: each must be one of"):
        sweep_points(tmp_path, objectives=["mse"])
    with pytest.raises(ConfigError, match="family must be one of"):
        sweep_points(tmp_path, "gpt3")


def test_the_transcoder_family_sweeps_k(tmp_path):
    """embedded-transcoder's presets are TopK: its sweep sets saes.k (SWEPT_KEYS), its run
    directories say k, and its values must be whole numbers."""
    points = sweep_points(tmp_path, "embedded-transcoder", ["local", "e2e", "e2e+ds"], {"local": [4, 32]})
    assert [p.name for p in points[:3]] == ["local-k4-seed0", "local-k32-seed0", "e2e-k8-seed0"]
    assert {p.objective: p.preset for p in points} == {"local": "embedded-transcoder", "e2e": "embedded-transcoder-e2e",
                                                  "e2e+ds": "embedded-transcoder-e2e-ds"}
    assert all(p.key == "saes.k" and p.sparsity_coeff is None for p in points)
    for point in (points[1], points[-1]):
        cfg = point_config(point)
        assert (cfg.saes.k, cfg.loss.sparsity_coeff, cfg.name) == (int(point.value), 0.0, point.name)
        assert cfg.saes.hooks == ["blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out"]
    ds = point_config(points[-1])
    assert (ds.loss.kl_coeff, ds.loss.downstream_coeff, ds.loss.downstream_hooks) == (0.5, 2.5,
                                                                                     ["blocks.1.hook_resid_post"])
    with pytest.raises(ConfigError, match="saes.k .* must be a whole number >= 1, got 2.5"):
        sweep_points(tmp_path, "embedded-transcoder", ["local"], {"local": [2.5]})
    # the other families still sweep the sparsity coefficient
    assert sweep_points(tmp_path, "embedded", ["local"])[0].key == "loss.sparsity_coeff"


def test_a_transcoder_sweep_trains_and_plots_by_k(tmp_path, tiny):
    lm, overrides = tiny
    hook = "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out"
    points = sweep_points(tmp_path / "sweep", "embedded-transcoder", ["local", "e2e"], {"local": [2, 4], "e2e": [4]})
    outcomes = run_sweep(points, [*overrides, "loss.downstream_hooks=[]", "saes.skip=true"], model=lm,
                         log=lambda line: None)
    assert set(outcomes.values()) == {"trained"}
    for point in points:
        record = json.loads((point.run_dir / "eval.json").read_text())
        assert record["hooks"] == [hook] and record["k"] == int(point.value) == record["metrics"]["l0"]
        assert record["transcoders"][hook]["compared_with"] == "blocks.1.hook_mlp_out"
    result = plot_runs([tmp_path / "sweep"], tmp_path / "figure")
    assert sorted((p.objective, p.k) for p in result["points"]) == [("e2e (topk)", 4), ("local (topk)", 2), ("local (topk)", 4)]


def test_a_held_run_is_skipped_by_other_processes(tmp_path):
    run_dir = tmp_path / "local-s1-seed0"
    with claim(run_dir) as first:
        assert first
        with claim(run_dir) as second:  # a second open file description: as another process
            assert not second
    with claim(run_dir) as again:
        assert again


def test_sweep_trains_skips_resumes_evaluates_and_plots(tmp_path, tiny):
    lm, overrides = tiny
    out = tmp_path / "sweep"
    points = sweep_points(out, "embedded", ["local", "e2e", "e2e+ds"],
                          {"local": [0.5, 4.0], "e2e": [0.5, 4.0], "e2e+ds": [1.0]})
    # one point already started elsewhere: a checkpoint at step 1 of 3
    started = Trainer(point_config(points[0], overrides), model=lm, run_dir=points[0].run_dir)
    started.fit(max_steps=1)
    assert point_status(points[0], 3) == "partial"

    outcomes = run_sweep(points, overrides, model=lm, log=lambda line: None)
    assert outcomes[points[0].run_dir] == "resumed"
    assert all(outcomes[p.run_dir] == "trained" for p in points[1:])
    for point in points:
        record = json.loads((point.run_dir / "eval.json").read_text())
        assert record["step"] == 3 and record["objective"] == point.objective
        assert record["sparsity_coeff"] == point.sparsity_coeff

    (points[1].run_dir / "eval.json").unlink()
    assert point_status(points[1], 3) == "needs_eval"
    again = run_sweep(points, overrides, model=lm, log=lambda line: None)
    assert again[points[1].run_dir] == "evaluated"
    assert all(again[p.run_dir] == "skipped (done)" for p in points if p is not points[1])

    result = plot_runs([out], tmp_path / "figure", title="tiny")
    names = sorted(path.name for path in result["files"])
    assert names == ["paper_figure.csv", "paper_figure.md", "paper_figure.png", "paper_figure.svg"]
    assert all(path.stat().st_size > 0 for path in result["files"])
    assert (tmp_path / "figure" / "paper_figure.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "figure" / "paper_figure.csv").open()))
    assert {(r["objective"], float(r["sparsity_coeff"])) for r in rows} == {
        ("local", 0.5), ("local", 4.0), ("e2e", 0.5), ("e2e", 4.0), ("e2e+ds", 1.0)}
    assert [r["objective"] for r in rows] == ["local", "local", "e2e", "e2e", "e2e+ds"]  # by objective, then L0
    assert float(rows[0]["l0"]) <= float(rows[1]["l0"]) and float(rows[2]["l0"]) <= float(rows[3]["l0"])
    assert len(rows) == 5 and all(int(r["n_latents"]) == 32 for r in rows)
    assert "| objective | sparsity coeff |" in (tmp_path / "figure" / "paper_figure.md").read_text()

    # the CLI: plot prints the table; a directory without runs is an error that names it
    assert main(["plot", str(out), "--out", str(tmp_path / "cli"), "--name", "fig"]) == 0
    assert (tmp_path / "cli" / "fig.svg").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2


def _point(objective, l0, ce, coeff=1.0):
    return Point(objective, coeff, 1, l0, ce, 0.0, 10.0, 32, None, None, 1000, 100)


def test_compare_curves_over_the_shared_l0_range():
    local = [_point("local", 10, 0.5), _point("local", 30, 0.3), _point("local", 60, 0.1)]
    below = [_point("e2e", 20, 0.2), _point("e2e", 80, 0.02)]
    result = compare_curves(local + below)
    assert result["l0_range"] == (20, 60) and result["below_everywhere"]
    crossing = [_point("e2e", 20, 0.2), _point("e2e", 50, 0.25)]  # above local's 0.15 at L0 50
    result = compare_curves(local + crossing)
    assert not result["below_everywhere"] and result["min_gap"] < 0
    assert "NOT everywhere below" in to_markdown(local + crossing, result)
    assert compare_curves(local + [_point("e2e", 100, 0.1), _point("e2e", 120, 0.05)]) is None  # no overlap


def test_seeds_of_a_point_are_averaged(tmp_path):
    for seed, (l0, ce) in enumerate([(10.0, 0.2), (20.0, 0.4)]):
        run = tmp_path / f"e2e-s1-seed{seed}"
        run.mkdir()
        (run / "eval.json").write_text(json.dumps({  # as written before "kind" became "objective": still read
            "kind": "e2e", "sparsity_coeff": 1.0, "hooks": ["h"], "n_latents": 8, "step": 5,
            "training_tokens": 640, "eval_tokens": 64,
            "metrics": {"l0": l0, "ce_increase": ce, "kl": 0.1, "alive/h": 4 + seed,
                        "explained_variance/h": 0.5, "downstream_explained_variance/blocks.2.hook_resid_post": 0.9}}))
    (point,) = collect_points(find_runs([tmp_path]))
    assert (point.seeds, point.l0, point.ce_increase, point.alive) == (2, 15.0, pytest.approx(0.3), 4.5)
    assert point.final_explained_variance == pytest.approx(0.9)


def test_runs_trained_differently_are_not_averaged_and_replaced_runs_are_skipped(tmp_path):
    def write(name, **changes):
        run = tmp_path / name
        run.mkdir()
        record = {"objective": "e2e", "sparsity_coeff": 1.0, "model": "m", "hooks": ["h"], "n_latents": 8, "step": 5,
                  "training_tokens": 640, "eval_tokens": 64,
                  "metrics": {"l0": 10.0, "ce_increase": 0.2, "kl": 0.1, "alive/h": 4}}
        (run / "eval.json").write_text(json.dumps({**record, **changes}))

    write("e2e-s1-seed0")
    write("e2e-s1-seed0.replaced-20261129-101010", n_latents=16)  # moved aside by --overwrite
    assert [run.name for run in find_runs([tmp_path])] == ["e2e-s1-seed0"]
    write("e2e-s1-seed1", n_latents=16)  # another dictionary size, same coefficient
    with pytest.raises(ValueError, match="trained differently"):
        collect_points(find_runs([tmp_path]))


def _eval_run(directory, objective, coeff, l0, alive, rare=None, n_latents=2048):
    directory.mkdir(parents=True)
    metrics = {"l0": l0, "ce_increase": 1 / l0, "kl": 0.5 / l0, "alive/h": alive}
    if rare is not None:
        metrics["rare/h"] = rare
    (directory / "eval.json").write_text(json.dumps({
        "objective": objective, "sparsity_coeff": coeff, "hooks": ["h"], "n_latents": n_latents, "step": 5,
        "training_tokens": 640, "eval_tokens": 8192, "metrics": metrics}))


def test_firing_counts():
    tokens_fired = torch.tensor([0, 1, 8, 9, 100, 0])  # of 9,000 eval tokens: rare below 9
    counts = firing_counts(tokens_fired, 9000)
    assert RARE_FREQUENCY * 9000 == 9
    assert (int(counts["alive"]), int(counts["rare"])) == (4, 4)
    with pytest.raises(ValueError, match="tokens_fired must be a 1-d integer tensor"):
        firing_counts(tokens_fired.float(), 9000)
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        firing_counts(tokens_fired, 0)


def test_flat_latent_panels_are_left_out_and_rare_latents_are_plotted(tmp_path):
    # every latent alive on every point (as on the embedded sweep): no alive panel; rare latents differ
    for i, (objective, coeff, l0, rare) in enumerate([("local", 1, 30, 400), ("local", 2, 15, 900),
                                                       ("e2e", 1, 25, 150), ("e2e", 2, 12, 300)]):
        _eval_run(tmp_path / "sweep" / f"{objective}-{i}", objective, coeff, l0, alive=2048 - i, rare=rare)
    points = collect_points(find_runs([tmp_path / "sweep"]))
    assert [p.rare for p in points] == [900, 400, 300, 150]  # by objective, then L0
    assert [attribute for attribute, _ in latent_panels(points)] == ["rare"]
    result = plot_runs([tmp_path / "sweep"], tmp_path / "fig")
    assert "| rare (< 1 in 1,000 tokens) |" in (tmp_path / "fig" / "paper_figure.md").read_text()
    assert "| 2,047 / 2,048 | 900 |" in (tmp_path / "fig" / "paper_figure.md").read_text()

    # again from the CSV it wrote: the same points
    again = plot_runs([tmp_path / "fig" / "paper_figure.csv"], tmp_path / "again")
    assert again["points"] == result["points"] and again["comparison"] == result["comparison"]
    assert (tmp_path / "again" / "paper_figure.png").read_bytes()[:4] == b"\x89PNG"

    # alive counts that differ by 1 % of the dictionary or more get their panel back
    points[0].alive = 1900
    assert [attribute for attribute, _ in latent_panels(points)] == ["alive", "rare"]
    # eval.json without rare/<hook> (written before it existed): no rare column, no rare panel
    for p in points:
        p.rare = None
    assert [attribute for attribute, _ in latent_panels(points)] == ["alive"]
    assert "rare" not in to_markdown(points)
    # a CSV written before the rare column existed still reads
    with open(tmp_path / "old.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, [c for c in COLUMNS if c != "rare"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv.DictReader(to_csv(points).splitlines()))
    assert read_csv(tmp_path / "old.csv") == points
    # a CSV written before the "objective" column was named so ("kind") still reads
    (tmp_path / "kind.csv").write_text(to_csv(points).replace("objective,", "kind,", 1))
    assert read_csv(tmp_path / "kind.csv") == points


def test_sweep_objectives_option_and_its_old_name():
    from fastsae.cli import _parser

    assert _parser().parse_args(["sweep", "--objectives", "local", "e2e"]).objectives == ["local", "e2e"]
    assert _parser().parse_args(["sweep", "--kinds", "e2e+ds"]).objectives == ["e2e+ds"]  # the old name
    assert _parser().parse_args(["sweep"]).objectives is None
    assert "--kinds" not in _parser()._subparsers._group_actions[0].choices["sweep"].format_help()


def test_plot_refuses_mixed_inputs_and_foreign_csvs(tmp_path, capsys):
    _eval_run(tmp_path / "run", "e2e", 1, 20, alive=2048)
    plot_runs([tmp_path / "run"], tmp_path / "fig")
    assert main(["plot", str(tmp_path / "run"), str(tmp_path / "fig" / "paper_figure.csv")]) == 2
    assert "not both" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert main(["plot", str(tmp_path / "other.csv"), "--out", str(tmp_path / "x")]) == 2
    assert "not a CSV written by `fastsae plot`" in capsys.readouterr().err
