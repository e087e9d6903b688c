"""The `fastsae` command.

    fastsae train embedded                      e2e SAE on the embedded model, CPU, offline
    fastsae train gpt2-e2e --set optim.n_tokens=1e8 --run-dir runs/e2e
    fastsae train my_config.yaml
    fastsae train --resume runs/e2e             continue a run exactly where it stopped
    fastsae eval runs/e2e [--tokens 100000]     the eval pass of a run's latest checkpoint
    fastsae eval --sae DIR[@HOOK] --model gpt2 --config gpt2-e2e   ... of a released SAE (any format)
    fastsae eval --sae RELEASE:ID --config gpt2-e2e --saebench core.json   ... by name; SAEBench's core metrics
    fastsae releases [RELEASE] [--model gpt2-small]   the released SAEs loadable by name
    fastsae export runs/e2e --format saelens    the run's latest SAEs as SAELens (or sparsify) dirs
    fastsae finetune runs/local --model embedded    a short KL + MSE fine-tune of any SAE, before and after
    fastsae presets [--show NAME]               the shipped configs
    fastsae plan gpt2-e2e --gpus 8 --gpu-memory 80GB   memory per GPU; the largest dictionary that fits
    fastsae sweep                               local / e2e / e2e+ds over a grid of sparsity coefficients
    fastsae plot runs/sweep-embedded --out figs the paper's figure (PNG, SVG) + CSV / markdown table
    fastsae analyze runs/sweep-embedded --out analysis   what the SAEs learned: similarities, UMAP, geometry
    fastsae dashboard runs/e2e --compare runs/local --out dash   feature dashboards: open dash/index.html

This module is longer than ~400 lines by its parsers: one argparse block and one small handler per
subcommand, kept together so that `fastsae COMMAND --help` and what the command does read side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsae", description="Train end-to-end sparse autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_subcommand in (_add_train_parser, _add_eval_parser, _add_releases_parser, _add_finetune_parser,
                           _add_presets_parser, _add_plan_parser, _add_export_parser, _add_sweep_parser,
                           _add_plot_parser, _add_analyze_parser, _add_dashboard_parser):  # the order of --help
        add_subcommand(commands)
    return parser


def _add_overrides(parser, help: str) -> None:
    """--set KEY=VALUE, repeatable: the config keys a subcommand overrides (args.overrides)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="train SAEs from a preset or a YAML config")
    train.add_argument("config", nargs="?", help="a preset name (see `fastsae presets`) or a YAML file")
    _add_overrides(train, "override a config key, e.g. --set optim.lr=1e-4 (repeatable; YAML values)")
    train.add_argument("--run-dir", help="where checkpoints and metrics go (default: runs/<name>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps")
    train.add_argument("--overwrite", action="store_true",
                       help="train into a --run-dir that holds another run: the old run is moved aside to "
                            "RUN_DIR.replaced-<time> (without it, a used run directory is refused)")


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a run's latest SAEs, or released SAEs (--sae), on held-out data",
        description="fastsae eval RUN_DIR evaluates a run's latest SAEs with the run's config. "
                    "fastsae eval --sae PATH[@HOOK] ... evaluates SAEs saved in any format E2ESAE.from_pretrained "
                    "reads (fastsae, SAELens, sparsify, e2e_sae); @HOOK picks the hook where the file holds "
                    "several SAEs or does not name it; --sae RELEASE:ID names a released SAE (`fastsae releases`). "
                    "The model is --model or the one the SAE names; data and eval settings come from --config "
                    "(a preset or YAML) and --set.")
    evaluate.add_argument("run_dir", nargs="?", help="a run directory (or give --sae)")
    evaluate.add_argument("--sae", action="append", default=[], metavar="PATH[@HOOK]|RELEASE:ID",
                          help="a released SAE to evaluate instead of a run's (repeatable: one per hook)")
    evaluate.add_argument("--saebench", metavar="OUT.json",
                          help="also SAEBench's core metrics of the (one) SAE, in its terms and JSON layout "
                               "(sae-bench 0.6.0 definitions, from the same pass plus one zero-ablated pass per "
                               "batch); also under the key saebench of eval.json")
    evaluate.add_argument("--model", help="with --sae: the model name or directory (default: the SAE's model_name)")
    evaluate.add_argument("--config", help="with --sae: preset or YAML for data and eval settings (default: embedded)")
    evaluate.add_argument("--out", help="with --sae: write eval.json to this directory")
    evaluate.add_argument("--tokens", type=int, help="eval tokens (default: the run's eval.n_tokens)")
    _add_overrides(evaluate, "override a config key of the run, e.g. --set device=cpu")


def _add_releases_parser(commands) -> None:
    releases = commands.add_parser(
        "releases", help="list the released SAEs loadable by name (RELEASE:ID)",
        description="The release registry: fastsae's own, SAELens's where sae-lens is installed, and the YAML "
                    "files in FASTSAE_RELEASES (fastsae.formats.releases). Load one with "
                    "E2ESAE.from_pretrained(RELEASE, sae_id=ID) or --sae RELEASE:ID.")
    releases.add_argument("release", nargs="?", help="list this release's SAEs")
    releases.add_argument("--model", help="only the releases of this model (e.g. gpt2-small, google/gemma-2-2b)")


def _add_presets_parser(commands) -> None:
    presets = commands.add_parser("presets", help="list the shipped configs")
    presets.add_argument("--show", metavar="NAME", help="print one preset's YAML")


def _add_plan_parser(commands) -> None:
    plan = commands.add_parser("plan", help="memory per GPU of a run, and the largest dictionary that fits")
    plan.add_argument("config", help="a preset name or a YAML file")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs (= torchrun processes): data groups x saes.shards")
    plan.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB (default 80GB)")
    _add_overrides(plan, "override a config key, e.g. --set saes.shards=8 --set saes.n_latents=16777216")


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="write a run's latest SAEs as SAELens or sparsify directories",
        description="One subdirectory per SAE: named by its hook for SAELens (SAE.load_from_disk(DIR/HOOK)), by "
                    "its hookpoint for sparsify (SparseCoder.load_many(DIR, local=True)). The conversions are exact; "
                    "see fastsae.formats.")
    export.add_argument("run_dir", help="a run directory, a checkpoint directory, or any path holding SAEs")
    export.add_argument("--format", required=True, choices=("saelens", "sparsify", "fastsae"))
    export.add_argument("--out", help="output directory (default: RUN_DIR/export-FORMAT)")
    export.add_argument("--layers-name", default="layers",
                        help="sparsify: the model's block list (layers; h for GPT-2), for the hookpoint names")


def _add_sweep_parser(commands) -> None:
    from fastsae.train.metrics import OBJECTIVES

    sweep = commands.add_parser(
        "sweep", help="train local, e2e and e2e+ds SAEs over a grid of sparsity coefficients",
        description="One run directory per (objective, sparsity coefficient, seed) under --out. Run it again to "
                    "resume: finished runs are skipped, started ones resume. Several processes with the "
                    "same arguments share the grid (each run is locked by the process training it).")
    sweep.add_argument("--family", default="embedded", help="preset family: embedded (default), gpt2, tinystories, "
                       "embedded-transcoder (TopK transcoders: the sweep sets saes.k, not the coefficient)")
    sweep.add_argument("--out", help="directory of the runs (default: runs/sweep-FAMILY)")
    sweep.add_argument("--objectives", nargs="+", default=None, metavar="OBJECTIVE",
                       help="training objectives: local e2e e2e+ds (default: all)")
    # the option's name before "objective" was the word: still accepted, not shown
    sweep.add_argument("--kinds", dest="objectives", nargs="+", help=argparse.SUPPRESS)
    for objective in OBJECTIVES:
        sweep.add_argument(f"--{objective.replace('+', '-')}-coeffs", dest=f"coeffs_{objective}", nargs="+",
                           type=float, metavar="C",
                           help=f"sparsity coefficients (k for a TopK family) of the {objective} runs (default: the "
                                "family's grid)")
    sweep.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    _add_overrides(sweep, "override a config key in every run, e.g. --set optim.n_tokens=2e5")


def _add_plot_parser(commands) -> None:
    plot = commands.add_parser("plot", help="draw CE loss increase (and alive / rare latents) vs L0 from evaluated runs")
    plot.add_argument("run_dirs", nargs="+",
                      help="run directories with an eval.json, sweep directories, or CSV files an earlier plot wrote")
    plot.add_argument("--out", default=".", help="where NAME.png/.svg/.csv/.md go (default: .)")
    plot.add_argument("--name", default="paper_figure", help="file name stem (default: paper_figure)")
    plot.add_argument("--title", help="figure title")


def _add_finetune_parser(commands) -> None:
    finetune = commands.add_parser(
        "finetune", help="a short KL + MSE fine-tune of trained SAEs (Karvonen 2025), measured before and after",
        description="Splices the SAEs (any format E2ESAE.from_pretrained reads: fastsae runs, SAELens, sparsify, "
                    "e2e_sae) into the model and trains them on KL + MSE, the KL weighted each step by the ratio of "
                    "the two losses so that neither dominates and the source's sparsity coefficient keeps its "
                    "meaning. The budget defaults to the paper's share, 5 % of the SAEs' training tokens. The "
                    "CE-loss gap, KL, L0 and explained variance on the same held-out tokens before and after go to "
                    "RUN_DIR/eval.json and are printed side by side; each SAE is written back in its format to "
                    "RUN_DIR/finetuned/. See fastsae.train.finetune for what follows the paper.")
    finetune.add_argument("saes", nargs="*", metavar="SAE[@HOOK]",
                          help="SAEs to fine-tune (one per hook): paths, or released SAEs as RELEASE:ID (fastsae "
                               "releases); @HOOK picks one where the path holds several")
    finetune.add_argument("--model", help="the model name or directory (default: the one the SAEs name)")
    finetune.add_argument("--config", help="preset or YAML for data, eval and optimizer (default: the model "
                                           "family's, e.g. embedded-finetune, gpt2-finetune)")
    budget = finetune.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=float, help="training tokens of the fine-tune (e.g. 25e6)")
    budget.add_argument("--fraction", type=float,
                        help="training tokens as a share of the SAEs' own (default 0.05, the paper's 25M of 500M)")
    finetune.add_argument("--run-dir", help="where the run goes (default: runs/<preset name>-<time>)")
    finetune.add_argument("--overwrite", action="store_true", help="move an old run in --run-dir aside")
    finetune.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted fine-tune and finish it")
    finetune.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps")
    _add_overrides(finetune, "override a config key, e.g. --set optim.lr=1e-4 (last word over the SAEs' and presets')")


def _add_dashboard_parser(commands) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="feature dashboards in the browser: what each latent fires on",
        description="Writes a static site to --out (open OUT/index.html from disk or any static server; nothing "
                    "is fetched from outside it): every latent's frequency, max activation and top tokens, "
                    "searchable by id and by token, and per latent its activation histogram, top activating "
                    "contexts, samples across activation quantiles, logit effect and nearest latents. Collected in "
                    "one streaming pass over --tokens tokens.")
    dashboard.add_argument("target", metavar="RUN_OR_SAE",
                           help="a run directory, a sweep directory, an SAE path PATH[@HOOK] in any format "
                                "E2ESAE.from_pretrained reads, or a released SAE RELEASE:ID")
    dashboard.add_argument("--compare", metavar="OTHER_SAE",
                           help="one more SAE (same forms): each latent lists its nearest latents there by decoder "
                                "cosine similarity, with links; it gets its own pages in the site")
    dashboard.add_argument("--out", required=True, help="output directory (a previous dashboard there is replaced)")
    dashboard.add_argument("--tokens", type=int, default=1_000_000,
                           help="tokens to read (default 1,000,000; fewer if the data ends: each is read once)")
    dashboard.add_argument("--split", default="eval", choices=("eval", "train"),
                           help="the data split read: eval (held out, default) or train")
    dashboard.add_argument("--model", help="the model for SAE paths (default: the one the SAE names)")
    dashboard.add_argument("--config", help="preset or YAML for the data (default: the run's own; embedded)")
    _add_overrides(dashboard, "override a config key, e.g. --set eval.batch_size=32")
    dashboard.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:1, ...")
    dashboard.add_argument("--top-k", type=int, default=20, help="top activating contexts per latent (default 20)")
    dashboard.add_argument("--samples", type=int, default=20,
                           help="random firings per latent shown by activation quantile (default 20)")
    dashboard.add_argument("--window", type=int, nargs=2, default=(16, 6), metavar=("BEFORE", "AFTER"),
                           help="tokens shown before and after each activation (default 16 6)")
    dashboard.add_argument("--seed", type=int, default=0, help="of the quantile samples (default 0)")


def _add_analyze_parser(commands) -> None:
    analyze = commands.add_parser(
        "analyze", help="geometric and activation analysis of trained SAEs (the paper's second half)",
        description="Per-latent statistics, within-SAE, cross-type and cross-seed similarities of the alive "
                    "decoder directions, UMAPs, and activation geometry, over held-out tokens. From a sweep "
                    "directory the compared SAEs are picked as the paper does (similar CE increase, similar L0); "
                    "--pair adds others. Writes figures (PNG, SVG), analysis.json, analysis.md and per-SAE "
                    "latent statistics to --out (needs the extra: pip install 'fastsae[analysis]').")
    analyze.add_argument("paths", nargs="+", metavar="RUN_OR_SAE",
                         help="run directories, sweep directories, SAE paths PATH[@HOOK] in any format "
                              "E2ESAE.from_pretrained reads, or released SAEs RELEASE:ID")
    analyze.add_argument("--out", required=True, help="output directory")
    analyze.add_argument("--tokens", type=int, default=1_000_000,
                         help="held-out tokens to stream (default 1,000,000; fewer if the held-out data ends)")
    analyze.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                         help="also compare SAE A with SAE B (labels: run directory names, or file names; repeatable)")
    analyze.add_argument("--no-umap", action="store_true", help="leave out the UMAPs (no umap-learn needed)")
    analyze.add_argument("--model", help="the model for SAE paths (default: the one the SAE names)")
    analyze.add_argument("--config", help="preset or YAML for the held-out data (default: the runs' own; embedded)")
    _add_overrides(analyze, "override a config key, e.g. --set eval.batch_size=8")
    analyze.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda, cuda:1, ...")
    analyze.add_argument("--precision", default="auto", choices=("auto", "fp32", "tf32", "bf16"),
                         help="of the similarity GEMMs (auto: TF32 on CUDA, fp32 on CPU)")
    analyze.add_argument("--seed", type=int, default=0, help="of the bootstrap intervals and the UMAP (default 0)")


def _train(args) -> int:
    from fastsae.train.config import ConfigError, load_config
    from fastsae.train.metrics import summarize
    from fastsae.train.trainer import Trainer

    if args.resume:
        if args.config:
            raise ConfigError("give a config or --resume RUN_DIR, not both "
                             "(a resumed run uses its saved config.yaml; change keys with --set)")
        trainer = Trainer.from_run_dir(args.resume, overrides=args.overrides)
        if trainer.layout.is_main:
            print(f"fastsae: resuming {args.resume} at step {trainer.step_count} "
                  f"({trainer.tokens_seen:,} tokens)", flush=True)
    else:
        if not args.config:
            raise ConfigError("give a preset name or a YAML config (see `fastsae presets`)")
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config, run_dir=args.run_dir, overwrite=args.overwrite)
    cfg = trainer.config
    if not trainer.layout.is_main:  # under torchrun rank 0 reports; the others only train
        try:
            trainer.fit(max_steps=args.max_steps)
        except KeyboardInterrupt:
            return 130
        return 0
    layout = f"; {trainer.layout.world_size} processes ({trainer.layout.data_size} data x " \
             f"{trainer.layout.shards} shards)" if trainer.layout.distributed else ""
    print(f"fastsae: training {len(trainer.hooks)} SAE(s) at {', '.join(trainer.hooks)} on {cfg.model.name} "
          f"({trainer.lm.n_layers} layers, d_model {trainer.lm.d_model}), "
          f"{trainer.saes[trainer.hooks[0]].n_latents} latents, {cfg.total_steps} steps of "
          f"{cfg.tokens_per_step} tokens, device {trainer.device}{layout}; run dir {trainer.run_dir}", flush=True)
    try:
        metrics = trainer.fit(max_steps=args.max_steps)
    except KeyboardInterrupt:
        return 130
    prefix = "eval/" if "eval/kl" in metrics else ""
    where = "held-out data" if prefix else f"the last training step (step {trainer.step_count})"
    print(f"\nfinal metrics on {where}:")
    print(summarize(metrics, trainer.hooks, prefix))
    print(f"\nSAEs and metrics.jsonl in {trainer.run_dir}")
    return 0


def _eval(args) -> int:
    from fastsae.train.config import ConfigError
    from fastsae.train.evaluator import evaluate_run
    from fastsae.train.metrics import summarize

    if args.sae:
        if args.run_dir:
            raise ConfigError("give a run directory or --sae PATH, not both")
        return _eval_released(args)
    if args.run_dir is None:
        raise ConfigError("give a run directory, or --sae PATH[@HOOK] for a released SAE")
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    # config.yaml + the overrides of its resumes (+ --set); no optimizer is built to evaluate
    metrics, path, state = evaluate_run(run_dir, overrides=args.overrides, n_tokens=args.tokens,
                                        saebench=bool(args.saebench))
    print(f"eval of {path} (step {state['step']}, {state['tokens_seen']:,} training tokens) "
          f"on {metrics['eval/tokens']:,} held-out tokens:")
    print(summarize(metrics, prefix="eval/"))
    print(f"\nwritten to {run_dir / 'eval.json'}")
    _write_saebench(args.saebench, metrics)
    return 0


def _write_saebench(path: str | None, metrics: dict) -> None:
    """--saebench OUT.json: SAEBench's core record, written atomically, and its headline numbers."""
    if not path:
        return
    import json

    from fastsae._files import atomic_write_text

    record = metrics["saebench"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(record, indent=2))
    m = record["eval_result_metrics"]
    print(f"SAEBench core ({record['eval_result_unstructured']['definitions']}): kl_div_score "
          f"{m['model_behavior_preservation']['kl_div_score']:.4f}, ce_loss_score "
          f"{m['model_performance_preservation']['ce_loss_score']:.4f}, explained_variance "
          f"{m['reconstruction_quality']['explained_variance']:.4f}, l0 {m['sparsity']['l0']:.1f} -> {path}")


def _plan(args) -> int:
    from fastsae.train.config import load_config
    from fastsae.train.plan import format_plan, memory_plan

    config = load_config(args.config, args.overrides)
    plan = memory_plan(config, gpus=args.gpus, gpu_memory=args.gpu_memory)
    print(format_plan(plan, config))
    return 0


def _eval_released(args) -> int:
    """`fastsae eval --sae PATH[@HOOK] ...`: SAEs from files, on the model they were trained on."""
    import json

    from fastsae import E2ESAE, formats
    from fastsae.train.config import ConfigError, load_config
    from fastsae.train.evaluator import Evaluator
    from fastsae.train.metrics import summarize

    saes = {}
    for spec in args.sae:
        path, hook = formats.split_hook(spec)
        try:
            sae = E2ESAE.from_pretrained(path, hook=hook)
        except ValueError as error:
            raise ConfigError(f"--sae {spec}: {error}") from None
        hook = hook or sae.metadata.get("hook")
        if not hook:
            raise ConfigError(f"--sae {spec}: the SAE does not say which hook it reads; write --sae {path}@HOOK")
        if hook in saes:
            raise ConfigError(f"--sae {spec}: a second SAE for hook {hook!r}")
        saes[hook] = sae
    # the SAEs' hooks; no downstream loss terms (an e2e+ds --config would name hooks of its own)
    overrides = [*args.overrides, f"saes.hooks={json.dumps(sorted(saes))}", "loss.downstream_hooks=[]",
                 "loss.downstream_coeff=0", "loss.downstream_coeffs=null"]
    # the model: --model, else --set model.name=..., else the one the SAEs name (SAELens' model_name)
    if args.model or not any(o.startswith("model.name=") for o in args.overrides):
        try:
            model = formats.one_model((sae.metadata.get("model") for sae in saes.values()), args.model)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        overrides.append(f"model.name={json.dumps(model)}")
    config = load_config(args.config or "embedded", overrides)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator.build(config, saes)
    # eval.json only where --out says: the config's run_dir may be another run's directory
    metrics = evaluator.evaluate(args.tokens, run_dir=args.out, saebench=bool(args.saebench))
    print(f"eval of {', '.join(args.sae)} on {config.model.name} ({metrics['eval/tokens']:,} held-out tokens):")
    print(summarize(metrics, evaluator.objective.hooks, "eval/"))
    if args.out:
        print(f"\nwritten to {Path(args.out) / 'eval.json'}")
    _write_saebench(args.saebench, metrics)
    return 0


def _releases(args) -> int:
    from fastsae.formats import releases

    try:
        print(releases.describe_release(args.release) if args.release else releases.describe_releases(args.model))
    except ValueError as error:
        from fastsae.train.config import ConfigError

        raise ConfigError(str(error)) from None
    return 0


def _finetune(args) -> int:
    from fastsae.train import finetune
    from fastsae.train.config import ConfigError

    def log(line):
        print(line, flush=True)

    if args.resume and args.saes:
        raise ConfigError("give SAEs or --resume RUN_DIR, not both")
    fixed = [flag for flag, value in (("--model", args.model), ("--config", args.config), ("--tokens", args.tokens),
                                      ("--fraction", args.fraction), ("--run-dir", args.run_dir),
                                      ("--overwrite", args.overwrite)) if value]
    if args.resume and fixed:
        raise ConfigError(f"--resume continues the fine-tune as it was set up: {', '.join(fixed)} cannot change it "
                          "(--set KEY=VALUE and --max-steps can)")
    if not args.saes and not args.resume:
        raise ConfigError("give the SAEs to fine-tune (PATH[@HOOK] ...), or --resume RUN_DIR")
    try:
        if args.resume:
            finetune.resume(args.resume, overrides=args.overrides, max_steps=args.max_steps, log=log)
            return 0
        finetune.finetune(args.saes, model=args.model, config=args.config, overrides=args.overrides,
                          tokens=args.tokens, fraction=args.fraction, run_dir=args.run_dir, overwrite=args.overwrite,
                          max_steps=args.max_steps, log=log)
    except KeyboardInterrupt:
        return 130
    return 0


def _export(args) -> int:
    from fastsae import formats
    from fastsae.train.config import ConfigError

    out = Path(args.out) if args.out else Path(args.run_dir) / f"export-{args.format}"
    try:
        written = formats.export(args.run_dir, args.format, out, layers_name=args.layers_name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for hook, directory in written.items():
        print(f"{hook} -> {directory}")
    return 0


def _presets(args) -> int:
    from fastsae.train.config import list_presets, resolve_config_path

    if args.show:
        print(resolve_config_path(args.show).read_text(), end="")
        return 0
    presets = list_presets()
    width = max(map(len, presets), default=0)
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _sweep(args) -> int:
    from fastsae.train.metrics import OBJECTIVES
    from fastsae.train.sweep import run_sweep, sweep_points

    coeffs = {objective: getattr(args, f"coeffs_{objective}") for objective in OBJECTIVES
              if getattr(args, f"coeffs_{objective}")}
    args.out = args.out or f"runs/sweep-{args.family}"
    points = sweep_points(args.out, args.family, args.objectives or OBJECTIVES, coeffs, args.seeds)
    print(f"fastsae: sweep of {len(points)} runs ({args.family} presets) in {args.out}", flush=True)
    start = time.perf_counter()
    try:
        outcomes = run_sweep(points, args.overrides, log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # the run in progress saved a checkpoint: the same command resumes
        print("fastsae: sweep interrupted; run the same command again to continue", flush=True)
        return 130
    print(f"\nsweep finished in {time.perf_counter() - start:.0f} s; "
          f"{sum(o.startswith(('trained', 'resumed', 'evaluated')) for o in outcomes.values())} run(s) done here. "
          f"Draw the figure with `fastsae plot {args.out} --out DIR`")
    return 0


def _plot(args) -> int:
    from fastsae.plot import plot_runs, to_markdown
    from fastsae.train.config import ConfigError

    try:
        result = plot_runs(args.run_dirs, args.out, args.name, args.title)
    except ValueError as error:  # runs that cannot share a figure, a CSV that is not a plot's
        raise ConfigError(str(error)) from None
    print(to_markdown(result["points"], result["comparison"]), end="")
    print("\nwritten: " + ", ".join(str(path) for path in result["files"]))
    return 0


def _analyze(args) -> int:
    from fastsae.analysis.pipeline import analyze
    from fastsae.analysis.stream import AnalysisError
    from fastsae.analysis.umap_regions import MissingExtraError
    from fastsae.train.config import ConfigError

    try:
        analyze(args.paths, args.out, n_tokens=args.tokens, model=args.model, config=args.config,
                overrides=args.overrides, pairs=[tuple(p) for p in args.pair], umap=not args.no_umap,
                device=args.device, precision=args.precision, seed=args.seed,
                log=lambda line: print(line, flush=True))
    except (AnalysisError, MissingExtraError) as error:
        raise ConfigError(str(error)) from None
    print(f"written: {Path(args.out) / 'analysis.md'}, analysis.json and the figures")
    return 0


def _dashboard(args) -> int:
    from fastsae.analysis.stream import AnalysisError
    from fastsae.dashboard import build_dashboard
    from fastsae.train.config import ConfigError

    try:
        record = build_dashboard(args.target, args.out, compare=args.compare, n_tokens=args.tokens, model=args.model,
                                 config=args.config, overrides=args.overrides, split=args.split, device=args.device,
                                 top_k=args.top_k, n_samples=args.samples, before=args.window[0],
                                 after=args.window[1], seed=args.seed, log=lambda line: print(line, flush=True))
    except AnalysisError as error:
        raise ConfigError(str(error)) from None
    for note in record["notes"]:
        print(f"note: {note}")
    print(f"written: {record['index']} (open it in a browser; #latent=N addresses a latent)")
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    from fastsae.train.config import ConfigError

    # Python hides DeprecationWarnings outside __main__: show fastsae's own (an old config key) once
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"fastsae(\.|$)")
    args = _parser().parse_args(argv)
    command = {"train": _train, "eval": _eval, "presets": _presets, "sweep": _sweep, "plot": _plot,
               "plan": _plan, "export": _export, "finetune": _finetune, "analyze": _analyze,
               "dashboard": _dashboard, "releases": _releases}[args.command]
    from fastsae.train.checkpoint import RunDirError

    try:
        return command(args)
    except (ConfigError, FileNotFoundError, RunDirError) as error:
        print(f"fastsae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
