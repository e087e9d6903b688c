"""The `fastsae` command.

    fastsae train embedded                      e2e SAE on the embedded model, CPU, offline
    fastsae train gpt2-e2e --set optim.n_tokens=1e8 --run-dir runs/e2e
    fastsae train my_config.yaml
    fastsae train --resume runs/e2e             continue a run exactly where it stopped
    fastsae eval runs/e2e [--tokens 100000]     the eval pass of a run's latest checkpoint
    fastsae presets [--show NAME]               the shipped configs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsae", description="Train end-to-end sparse autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train SAEs from a preset or a YAML config")
    train.add_argument("config", nargs="?", help="a preset name (see `fastsae presets`) or a YAML file")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=1e-4 (repeatable; YAML values)")
    train.add_argument("--run-dir", help="where checkpoints and metrics go (default: runs/<name>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps")

    evaluate = commands.add_parser("eval", help="evaluate a run's latest SAEs on held-out data")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--tokens", type=int, help="eval tokens (default: the run's eval.n_tokens)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key of the run, e.g. --set device=cpu")

    presets = commands.add_parser("presets", help="list the shipped configs")
    presets.add_argument("--show", metavar="NAME", help="print one preset's YAML")
    return parser


def _train(args) -> int:
    from fastsae.train.config import ConfigError, load_config
    from fastsae.train.trainer import Trainer, summarize

    if args.resume:
        if args.config:
            raise ConfigError("give a config or --resume RUN_DIR, not both "
                             "(a resumed run uses its saved config.yaml; change keys with --set)")
        trainer = Trainer.from_run_dir(args.resume, overrides=args.overrides)
        print(f"fastsae: resuming {args.resume} at step {trainer.step_count} "
              f"({trainer.tokens_seen:,} tokens)", flush=True)
    else:
        if not args.config:
            raise ConfigError("give a preset name or a YAML config (see `fastsae presets`)")
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config, run_dir=args.run_dir)
    cfg = trainer.config
    print(f"fastsae: training {len(trainer.hooks)} SAE(s) at {', '.join(trainer.hooks)} on {cfg.model.name} "
          f"({trainer.lm.n_layers} layers, d_model {trainer.lm.d_model}), "
          f"{trainer.saes[trainer.hooks[0]].n_latents} latents, {cfg.total_steps} steps of "
          f"{cfg.tokens_per_step} tokens, device {trainer.device}; run dir {trainer.run_dir}", flush=True)
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
    from fastsae.train import checkpoint as ckpt
    from fastsae.train.config import ConfigError, load_config
    from fastsae.train.trainer import Trainer, summarize, resolve_device

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml", args.overrides)
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise ConfigError(f"{run_dir} has no complete checkpoint")
    saes, state = ckpt.load_checkpoint(path, device=resolve_device(config.device))
    trainer = Trainer(config, run_dir=run_dir, saes=saes)
    metrics = trainer.evaluate(args.tokens)
    print(f"eval of {path} (step {state['step']}, {state['tokens_seen']:,} training tokens) "
          f"on {metrics['eval/tokens']:,} held-out tokens:")
    print(summarize(metrics, trainer.hooks, "eval/"))
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


def main(argv: list[str] | None = None) -> int:
    from fastsae.train.config import ConfigError

    args = _parser().parse_args(argv)
    command = {"train": _train, "eval": _eval, "presets": _presets}[args.command]
    try:
        return command(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"fastsae {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
