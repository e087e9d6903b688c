"""The paper's headline figure from evaluated runs: CE loss increase vs L0, one curve per objective
(local, e2e, e2e+ds), beside alive latents and rare latents vs L0 where those differ between the
points, plus the points as CSV and a markdown table.

    fastsae plot runs/sweep-embedded --out docs/paper_figure      # a sweep dir or run dirs
    fastsae plot docs/paper_figure/paper_figure.csv --out docs/x  # again from the points' CSV

Each run contributes its eval.json (written by `fastsae train`, `fastsae eval` or `fastsae sweep`).
Runs of one objective and sparsity coefficient (several seeds) are averaged into one point. SAEs of
another activation than the paper's ReLU get curves of their own, labelled e.g. "e2e (topk)". A
panel whose points all lie within 1 % of the dictionary of each other (e.g. every latent alive on
every point) says nothing and is left out. Only the figure needs matplotlib (`pip install
fastsae[plot]`); the CSV and table are written without it.
"""

from __future__ import annotations

import csv
import io
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

from fastsae.train.metrics import EVAL_FILE, RARE_FREQUENCY, OBJECTIVES, read_eval_json

OBJECTIVE_STYLE = dict(zip(OBJECTIVES, [("tab:blue", "o"), ("tab:orange", "s"), ("tab:green", "^")]))
COLUMNS = ("objective", "sparsity_coeff", "k", "seeds", "l0", "ce_increase", "kl", "alive", "rare", "n_latents",
           "explained_variance", "final_explained_variance", "training_tokens", "eval_tokens")
RARE_LABEL = f"rare latents (fired on < 1 in {1 / RARE_FREQUENCY:,.0f} eval tokens)"


@dataclass
class Point:
    """One (objective, sparsity coefficient) point, averaged over its runs (seeds)."""

    objective: str
    sparsity_coeff: float
    seeds: int
    l0: float
    ce_increase: float
    kl: float
    alive: float
    n_latents: int | None
    explained_variance: float | None  # of the (first) SAE's input; a transcoder's: of the activation at OUT
    final_explained_variance: float | None  # of the final residual, spliced vs clean
    training_tokens: int
    eval_tokens: int
    k: float | None = None  # the activation's k (topk, batchtopk): their curves run over k
    rare: float | None = None  # latents that fired on fewer than RARE_FREQUENCY of the eval tokens


def find_runs(paths) -> list[Path]:
    """The run directories with an eval.json among `paths` and, for a sweep directory, its children."""
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"no directory at {path}")
        if (path / EVAL_FILE).is_file():
            runs.append(path)
            continue
        # a run moved aside by --overwrite (RUN.replaced-<time>) is not one of the sweep's points
        children = sorted(child for child in path.iterdir()
                          if (child / EVAL_FILE).is_file() and ".replaced-" not in child.name)
        if not children:
            raise FileNotFoundError(f"{path} has no {EVAL_FILE} and no run directory with one inside; "
                                    "evaluate runs with `fastsae eval RUN_DIR`")
        runs.extend(children)
    return runs


def _run_values(record: dict) -> dict:
    metrics, hooks = record["metrics"], record["hooks"]
    finals = sorted(k for k in metrics if k.startswith("downstream_explained_variance/") and k.endswith("hook_resid_post"))
    n_latents = record.get("n_latents")
    return {
        "l0": metrics["l0"],
        "ce_increase": metrics["ce_increase"],
        "kl": metrics["kl"],
        "alive": sum(metrics.get(f"alive/{hook}", 0) for hook in hooks),
        # eval.json files written before rare/<hook> existed have none
        "rare": sum(metrics[f"rare/{hook}"] for hook in hooks) if all(f"rare/{hook}" in metrics for hook in hooks)
        else None,
        "n_latents": n_latents,
        "explained_variance": metrics.get(f"explained_variance/{hooks[0]}"),
        "final_explained_variance": metrics[finals[-1]] if finals else None,
        "training_tokens": record["training_tokens"],
        "eval_tokens": record["eval_tokens"],
    }


def curve_label(record: dict) -> str:
    """The curve an eval.json belongs to: its objective, with the activation when it is not ReLU."""
    activation = record.get("activation", "relu")  # eval.json files before activations were recorded
    return record["objective"] if activation == "relu" else f"{record['objective']} ({activation})"


def collect_points(run_dirs) -> list[Point]:
    """One Point per (objective, sparsity coefficient): the mean over its runs, sorted by objective and L0."""
    groups: dict[tuple, list[dict]] = {}
    setups: dict[tuple, dict] = {}
    for run_dir in run_dirs:
        record = read_eval_json(run_dir)
        key = (curve_label(record), float(record["sparsity_coeff"]), record.get("k"))
        # runs averaged into one point must differ only in their seed
        setup = {"model": record.get("model"), "hooks": record["hooks"], "n_latents": record.get("n_latents"),
                 "training_tokens": record["training_tokens"]}
        if setups.setdefault(key, setup) != setup:
            raise ValueError(f"{run_dir}: a {key[0]} run with sparsity coefficient {key[1]:g} like another one, but "
                             f"trained differently ({setup} vs {setups[key]}); plot one setup at a time")
        groups.setdefault(key, []).append(_run_values(record))
    points = []
    for (objective, coeff, k), runs in groups.items():
        def mean(key):
            values = [run[key] for run in runs if run[key] is not None]
            return sum(values) / len(values) if values else None

        points.append(Point(objective, coeff, len(runs), mean("l0"), mean("ce_increase"), mean("kl"), mean("alive"),
                            runs[0]["n_latents"], mean("explained_variance"), mean("final_explained_variance"),
                            int(mean("training_tokens")), int(mean("eval_tokens")), k, mean("rare")))
    return _sorted(points)


def _sorted(points: list[Point]) -> list[Point]:
    """By objective (OBJECTIVES first), then L0."""
    order = {objective: i for i, objective in enumerate(OBJECTIVES)}
    return sorted(points, key=lambda p: (order.get(p.objective, len(order)), p.l0))


def read_csv(path: str | os.PathLike) -> list[Point]:
    """The points of a CSV that to_csv wrote (a column added later, k or rare, may be missing; an
    older CSV's "kind" column is read as "objective")."""
    numbers = {"sparsity_coeff": float, "k": float, "seeds": int, "l0": float, "ce_increase": float, "kl": float,
               "alive": float, "rare": float, "n_latents": int, "explained_variance": float,
               "final_explained_variance": float, "training_tokens": int, "eval_tokens": int}
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    points = []
    for line, row in enumerate(rows, start=2):
        if "kind" in row and "objective" not in row:  # CSVs written before the column was renamed
            row["objective"] = row.pop("kind")
        missing = [c for c in COLUMNS if c not in ("k", "rare") and c not in row]
        if missing:
            raise ValueError(f"{path}: not a CSV written by `fastsae plot` (no column {', '.join(missing)})")
        try:
            values = {c: (numbers[c](row[c]) if row.get(c) else None) if c in numbers else row[c]
                      for c in COLUMNS if c in row}
        except ValueError as error:
            raise ValueError(f"{path}, line {line}: {error}") from None
        points.append(Point(**values))
    return _sorted(points)


def _interpolate(points: list[Point], l0: float) -> float:
    """CE increase of a curve (points sorted by L0) at l0, linear in L0 between its points."""
    for left, right in zip(points, points[1:]):
        if left.l0 <= l0 <= right.l0:
            if right.l0 == left.l0:
                return min(left.ce_increase, right.ce_increase)
            t = (l0 - left.l0) / (right.l0 - left.l0)
            return left.ce_increase + t * (right.ce_increase - left.ce_increase)
    raise ValueError(f"L0 {l0} is outside the curve's range")


def compare_curves(points: list[Point], lower: str = "e2e", upper: str = "local") -> dict | None:
    """Whether `lower`'s CE-increase curve lies below `upper`'s over the L0 range both cover.

    Both curves are linear in L0 between their points; they are compared at every point of either
    curve inside the shared range. Returns None when the curves share no L0 range.
    """
    a = sorted((p for p in points if p.objective == lower), key=lambda p: p.l0)
    b = sorted((p for p in points if p.objective == upper), key=lambda p: p.l0)
    if len(a) < 2 or len(b) < 2:
        return None
    low, high = max(a[0].l0, b[0].l0), min(a[-1].l0, b[-1].l0)
    if low >= high:
        return None
    grid = sorted({low, high, *(p.l0 for p in a + b if low <= p.l0 <= high)})
    gaps = [_interpolate(b, l0) - _interpolate(a, l0) for l0 in grid]
    return {"lower": lower, "upper": upper, "l0_range": (low, high), "n_compared": len(grid),
            "below_everywhere": all(gap > 0 for gap in gaps), "min_gap": min(gaps), "max_gap": max(gaps)}


def _fmt(value, digits=4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def to_csv(points: list[Point]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for p in points:
        writer.writerow([getattr(p, c) if getattr(p, c) is not None else "" for c in COLUMNS])
    return out.getvalue()


def to_markdown(points: list[Point], comparison: dict | None = None) -> str:
    with_rare = any(p.rare is not None for p in points)
    header = ("| objective | sparsity coeff | seeds | L0 | CE increase (nats) | KL | alive | "
              + (f"rare (< 1 in {1 / RARE_FREQUENCY:,.0f} tokens) | " if with_rare else "")
              + "explained variance | final-residual EV |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for p in points:
        alive = f"{round(p.alive):,}" + (f" / {p.n_latents:,}" if p.n_latents else "")
        coeff = _fmt(p.sparsity_coeff) + (f" (k={_fmt(p.k)})" if p.k is not None else "")
        rare = (f"{round(p.rare):,} | " if p.rare is not None else " | ") if with_rare else ""
        lines.append(f"| {p.objective} | {coeff} | {p.seeds} | {p.l0:.1f} | {p.ce_increase:.4f} | "
                     f"{p.kl:.4f} | {alive} | {rare}{_fmt(p.explained_variance, 3)} | "
                     f"{_fmt(p.final_explained_variance, 3)} |")
    if comparison is not None:
        low, high = comparison["l0_range"]
        verdict = "below" if comparison["below_everywhere"] else "NOT everywhere below"
        lines.append("")
        lines.append(f"Over the L0 range both cover ({low:.1f} to {high:.1f}), the {comparison['lower']} curve "
                     f"lies {verdict} the {comparison['upper']} curve: CE-increase gap "
                     f"{comparison['min_gap']:.4f} to {comparison['max_gap']:.4f} nats at "
                     f"{comparison['n_compared']} L0 values.")
    tokens = sorted({p.training_tokens for p in points})
    seeds = sorted({p.seeds for p in points})
    lines.append("")
    lines.append(f"Training tokens per run: {', '.join(f'{t:,}' for t in tokens)}; runs (seeds) per point: "
                 f"{', '.join(map(str, seeds))}; eval tokens per run: "
                 f"{', '.join(f'{t:,}' for t in sorted({p.eval_tokens for p in points}))}.")
    return "\n".join(lines) + "\n"


def varies(values: list[float], n_latents: int | None) -> bool:
    """Whether latent counts differ between points by at least 1 % of the dictionary (of the
    largest count where the dictionary size is not known): a flatter panel says nothing."""
    if len(values) < 2:
        return False
    scale = n_latents or max(values)
    return max(values) - min(values) >= max(1.0, 0.01 * scale)


def latent_panels(points: list[Point]) -> list[tuple[str, str]]:
    """The latent-count panels worth drawing beside CE vs L0: (Point attribute, axis label)."""
    sizes = {p.n_latents for p in points}
    n_latents = sizes.pop() if len(sizes) == 1 else None
    panels = []
    if varies([p.alive for p in points], n_latents):
        panels.append(("alive", "alive latents"))
    if all(p.rare is not None for p in points) and varies([p.rare for p in points], n_latents):
        panels.append(("rare", RARE_LABEL))
    return panels


def draw(points: list[Point], stem: Path, title: str | None = None) -> list[Path]:
    """The figure as STEM.png and STEM.svg: CE increase vs L0, and latent_panels(points)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("`fastsae plot` draws with matplotlib: `pip install matplotlib` "
                          "(or `pip install fastsae[plot]`)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = latent_panels(points)
    width = 6 if not panels else 5 * (1 + len(panels))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(width, 4), constrained_layout=True, squeeze=False)
    ax_ce, latent_axes = axes[0][0], axes[0][1:]
    objectives = [k for k in OBJECTIVES if any(p.objective == k for p in points)] + sorted(
        {p.objective for p in points} - set(OBJECTIVES))
    for objective in objectives:
        curve = [p for p in points if p.objective == objective]
        color, marker = OBJECTIVE_STYLE.get(objective, (None, "x"))
        l0 = [p.l0 for p in curve]
        ax_ce.plot(l0, [p.ce_increase for p in curve], marker=marker, color=color, label=objective)
        for ax, (attribute, _) in zip(latent_axes, panels):
            ax.plot(l0, [getattr(p, attribute) for p in curve], marker=marker, color=color, label=objective)
    log_ce = all(p.ce_increase > 0 for p in points)  # CE increases span decades across a sweep
    ax_ce.set(xlabel="L0 (active latents per token)",
              ylabel="CE loss increase (nats, log scale)" if log_ce else "CE loss increase (nats)",
              title="CE loss increase vs L0")
    if log_ce:
        ax_ce.set_yscale("log")
    n_latents = {p.n_latents for p in points if p.n_latents}
    for ax, (attribute, label) in zip(latent_axes, panels):
        ax.set(xlabel="L0 (active latents per token)", ylabel=label, title=f"{label.split(' (')[0]} vs L0")
        if attribute == "alive" and len(n_latents) == 1:
            ax.axhline(next(iter(n_latents)), color="gray", linestyle=":", linewidth=1, label="dictionary size")
        # alive counts read against the whole dictionary; rare ones, a small part of it, on their own scale
        top = max([getattr(p, attribute) for p in points] + [p.n_latents or 0 for p in points if attribute == "alive"])
        ax.set_ylim(0, 1.05 * top)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(textwrap.fill(title, 11 * width))  # about 11 characters of the title per inch
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def plot_runs(run_paths, out: str | os.PathLike, name: str = "paper_figure", title: str | None = None) -> dict:
    """Write OUT/NAME.csv, OUT/NAME.md, OUT/NAME.png and OUT/NAME.svg from the runs' eval.json, or
    from CSV files an earlier plot wrote (all of run_paths are one or the other).

    Returns {"points", "comparison", "files"}.
    """
    paths = [Path(path) for path in run_paths]
    csvs = [path for path in paths if path.suffix == ".csv" and path.is_file()]
    if csvs and len(csvs) < len(paths):
        raise ValueError("give run or sweep directories, or CSV files written by `fastsae plot`, not both")
    points = _sorted([p for path in csvs for p in read_csv(path)]) if csvs else collect_points(find_runs(paths))
    comparison = compare_curves(points)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    files = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
    files[0].write_text(to_csv(points))
    files[1].write_text(to_markdown(points, comparison))
    files += draw(points, stem, title)
    return {"points": points, "comparison": comparison, "files": files}
