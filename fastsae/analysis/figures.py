"""The figures of `fastsae analyze`, drawn from the numbers of analysis.json (PNG at 150 dpi + SVG,
matplotlib's Agg backend, the objective colours of `fastsae plot`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastsae.plot import OBJECTIVE_STYLE
from fastsae.train.metrics import OBJECTIVES

OTHER_COLOR = "tab:gray"
MAX_ROWS = 8  # SAEs drawn one per row where no matched set picks them


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _color(objective):
    return OBJECTIVE_STYLE.get(objective, (OTHER_COLOR, "x"))[0]


def _marker(objective):
    return OBJECTIVE_STYLE.get(objective, (OTHER_COLOR, "x"))[1]


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"]  # a label may hold a "."
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    _plt().close(fig)
    return paths


def _stairs(ax, hist: dict, color, label=None, fill=True):
    counts = np.asarray(hist["counts"], dtype=float)
    edges = np.asarray(hist["edges"], dtype=float)
    ax.stairs(counts, edges, fill=fill, color=color, alpha=0.6 if fill else 1.0, label=label)


def _occupied(hist: dict, pad: float) -> tuple[float, float]:
    """The x range of a histogram's non-empty bins, widened by ``pad``."""
    counts = np.asarray(hist["counts"])
    edges = np.asarray(hist["edges"], dtype=float)
    filled = np.flatnonzero(counts)
    if not len(filled):
        return float(edges[0]), float(edges[-1])
    return max(float(edges[0]), float(edges[filled[0]]) - pad), min(float(edges[-1]), float(edges[filled[-1] + 1]) + pad)


def _describe(result: dict, label: str) -> str:
    sae = result["saes"][label]
    if sae["objective"] is None:
        return label
    seed = f", seed {sae['seed']}" if sae["seed"] is not None else ""
    return f"{sae['objective']} (sparsity {sae['sparsity_coeff']:g}{seed})"


def featured(result: dict) -> list[str]:
    """The SAEs drawn one per row: the similar-CE matched set (local, e2e, e2e+ds order) of the first
    hook, or else the first MAX_ROWS SAEs."""
    if result["matched"]["ce"]:
        chosen = result["matched"]["ce"][0]["targets"]
        return [chosen[objective] for objective in OBJECTIVES if objective in chosen]
    return list(result["saes"])[:MAX_ROWS]


def feature_density(result: dict, stem: Path) -> list[Path]:
    """log10 firing-frequency histograms of the alive latents, one panel per objective, a line per SAE."""
    plt = _plt()
    groups: dict = {}
    for label, sae in result["saes"].items():
        groups.setdefault(sae["objective"], []).append(label)
    objectives = [k for k in OBJECTIVES if k in groups] + [k for k in groups if k not in OBJECTIVES]
    fig, axes = plt.subplots(1, len(objectives), figsize=(4.2 * len(objectives), 3.4), sharey=True,
                             constrained_layout=True,
                             squeeze=False)
    for ax, objective in zip(axes[0], objectives):
        labels = sorted(groups[objective], key=lambda l: (result["saes"][l]["sparsity_coeff"] or 0, result["saes"][l]["seed"] or 0, l))
        coeffs = sorted({result["saes"][l]["sparsity_coeff"] for l in labels}, key=lambda c: c or 0)
        cmap = plt.get_cmap({"local": "Blues", "e2e": "Oranges", "e2e+ds": "Greens"}.get(objective, "Greys"))
        for label in labels:
            sae = result["saes"][label]
            hist = sae["latent_stats"]["log10_frequency_histogram"]
            shade = cmap(0.45 + 0.5 * coeffs.index(sae["sparsity_coeff"]) / max(len(coeffs) - 1, 1))
            name = label if objective is None else f"s={sae['sparsity_coeff']:g}" + (
                f" seed {sae['seed']}" if sae["seed"] is not None else "")
            ax.stairs(hist["counts"], hist["edges"], color=shade, linewidth=1.4,
                      linestyle="-" if (sae["seed"] or 0) == min((result["saes"][l]["seed"] or 0) for l in labels) else "--",
                      label=f"{name}: {hist['dead']} dead")
        ax.set(title=f"{objective or 'SAEs'}", xlabel="log10 firing frequency (alive latents)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("latents")
    fig.suptitle(f"Feature density over {result['tokens']:,} held-out tokens")
    return _save(fig, stem)


def _hist_panel(ax, hist: dict, summary: dict, color, title: str):
    _stairs(ax, hist, color)
    ax.axvline(summary["mean"], color="k", linestyle="--", linewidth=1)
    low, high = summary["ci95"]
    ax.text(0.02, 0.95, f"mean {summary['mean']:.3f}\n95% CI [{low:.3f}, {high:.3f}]\nn = {summary['n']:,}",
            transform=ax.transAxes, va="top", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_yticks([])
    ax.set_xlim(0, 1)


def within_similarity(result: dict, stem: Path) -> list[Path]:
    """Histograms of each alive direction's max cosine similarity with another of its SAE:
    the matched sets (columns: similar CE, similar L0), or the first SAEs."""
    plt = _plt()
    columns = [(f"similar {g['rule'].upper()} ({g['hook']})", [g["targets"][k] for k in OBJECTIVES if k in g["targets"]])
               for g in result["matched"]["ce"] + result["matched"]["l0"]]
    if not columns:
        columns = [("SAEs", list(result["saes"])[:MAX_ROWS])]
    columns = [(title, [l for l in labels if result["saes"][l]["within_similarity"]]) for title, labels in columns]
    rows = max(len(labels) for _, labels in columns) or 1
    fig, axes = plt.subplots(rows, len(columns), figsize=(4.2 * len(columns), 1.7 * rows + 0.8), sharex=True,
                             constrained_layout=True, squeeze=False)
    for c, (title, labels) in enumerate(columns):
        axes[0][c].annotate(title, (0.5, 1.25), xycoords="axes fraction", ha="center", fontweight="bold")
        for r in range(rows):
            ax = axes[r][c]
            if r >= len(labels):
                ax.axis("off")
                continue
            summary = result["saes"][labels[r]]["within_similarity"]
            _hist_panel(ax, summary["histogram"], summary, _color(result["saes"][labels[r]]["objective"]),
                        _describe(result, labels[r]))
        axes[-1][c].set_xlabel("max cosine similarity with another alive latent")
    fig.suptitle("Within-SAE similarity of decoder directions")
    return _save(fig, stem)


def within_similarity_vs(result: dict, stem: Path) -> list[Path] | None:
    """Mean within-SAE max cosine similarity (95% CI) against L0, CE increase and alive latents,
    for every SAE with eval data (the paper's summary plot)."""
    points = [(l, s) for l, s in result["saes"].items() if s["eval"] and s["within_similarity"]]
    if not points:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True, constrained_layout=True)
    xs = (("l0", "L0 (active latents per token)"), ("ce_increase", "CE loss increase (nats)"),
          ("alive", "alive latents"))
    objectives = [k for k in OBJECTIVES if any(s["objective"] == k for _, s in points)] + \
        sorted({s["objective"] for _, s in points if s["objective"] not in OBJECTIVES}, key=str)
    for ax, (key, xlabel) in zip(axes, xs):
        for objective in objectives:
            chosen = sorted((s for _, s in points if s["objective"] == objective and s["eval"].get(key) is not None),
                            key=lambda s: s["eval"][key])
            if not chosen:
                continue
            x = [s["eval"][key] for s in chosen]
            y = [s["within_similarity"]["mean"] for s in chosen]
            err = np.array([[s["within_similarity"]["mean"] - s["within_similarity"]["ci95"][0],
                             s["within_similarity"]["ci95"][1] - s["within_similarity"]["mean"]] for s in chosen]).T
            ax.errorbar(x, y, yerr=err, color=_color(objective), marker=_marker(objective), linestyle="none",
                        label=objective or "SAE",
                        capsize=2)
        if key == "ce_increase" and all(s["eval"].get(key, 0) and s["eval"][key] > 0 for _, s in points):
            ax.set_xscale("log")
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean max cosine similarity\n(lower: more orthogonal)")
    axes[0].legend()
    fig.suptitle("Within-SAE similarity across the runs")
    return _save(fig, stem)


def cross_similarity(result: dict, key: str, stem: Path, title: str, xlabel: str) -> list[Path] | None:
    """Histograms of each alive latent of A's max cosine similarity with any alive latent of B."""
    entries = result[key]
    if not entries:
        return None
    plt = _plt()
    groups: dict = {}
    for entry in entries:
        reason = entry["reason"]
        column = reason.split(", ")[-1] if key == "cross_type" and ", similar" in reason else (
            "given pairs" if reason == "given" else "seeds")
        groups.setdefault(column, []).append(entry)
    columns = list(groups.items())
    rows = max(len(v) for _, v in columns)
    fig, axes = plt.subplots(rows, len(columns), figsize=(4.2 * len(columns), 1.7 * rows + 0.8), sharex=True,
                             constrained_layout=True, squeeze=False)
    for c, (column, group) in enumerate(columns):
        axes[0][c].annotate(column, (0.5, 1.25), xycoords="axes fraction", ha="center", fontweight="bold")
        for r in range(rows):
            ax = axes[r][c]
            if r >= len(group):
                ax.axis("off")
                continue
            entry = group[r]
            objective_a = result["saes"][entry["a"]]["objective"]
            objective_b = result["saes"][entry["b"]]["objective"]
            name = (f"{objective_a} -> {objective_b}"
                    if key == "cross_type" and objective_a and objective_b and objective_a != objective_b
                    else entry["reason"] if key == "cross_seed" else f"{entry['a']} -> {entry['b']}")
            _hist_panel(ax, entry["histogram"], entry, _color(objective_a), name)
        axes[-1][c].set_xlabel(xlabel)
    fig.suptitle(title)
    return _save(fig, stem)


def umap_figure(result: dict, entry: dict, embedding: np.ndarray, stem: Path) -> list[Path]:
    """The two dictionaries' alive directions in one UMAP, coloured by SAE, regions that only one
    dictionary covers boxed and lettered (their latent ids are in analysis.json)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 7), constrained_layout=True)
    n_a = entry["n_a"]
    for label, part in ((entry["a"], embedding[:n_a]), (entry["b"], embedding[n_a:])):
        objective = result["saes"][label]["objective"]
        other = result["saes"][entry["b" if label == entry["a"] else "a"]]["objective"]
        color = _color(objective) if objective != other else None
        ax.scatter(part[:, 0], part[:, 1], s=2, alpha=0.35, color=color,
                   label=f"{_describe(result, label)}: {len(part):,} alive")
    for region in entry["regions"][:26]:
        xmin, xmax, ymin, ymax = region["bounds"]
        pad = 0.1
        ax.add_patch(plt.Rectangle((xmin - pad, ymin - pad), xmax - xmin + 2 * pad, ymax - ymin + 2 * pad,
                                   fill=False, edgecolor="red", linewidth=1))
        ax.text(xmin - pad, ymax + pad, region["letter"], color="red", fontsize=9, fontweight="bold",
                va="bottom", ha="left")
    ax.set_xticks([])
    ax.set_yticks([])
    legend = ax.legend(loc="lower right", markerscale=5)
    for handle in legend.legend_handles:
        handle.set_alpha(1)
    n_regions = len(entry["regions"])
    ax.set_title(f"UMAP of alive decoder directions ({entry['reason']})\n"
                 f"red boxes: {n_regions} region(s) where only one SAE has latents (ids in analysis.json)", fontsize=9)
    return _save(fig, stem)


def activation_geometry(result: dict, scatter: dict, stem: Path) -> list[Path]:
    """Per featured SAE: cos(x, x_hat), ||x_hat|| / ||x||, the norm scatter, and the spliced run's
    cosine with the clean one at the final residual."""
    plt = _plt()
    labels = featured(result)
    fig, axes = plt.subplots(len(labels), 4, figsize=(15, 2.3 * len(labels) + 0.8), constrained_layout=True,
                             squeeze=False)
    for r, label in enumerate(labels):
        sae = result["saes"][label]
        geo = sae["activation_geometry"]
        io = geo["sae_output_vs_input"]
        color = _color(sae["objective"])
        ax = axes[r][0]
        _stairs(ax, io["histograms"]["cosine"], color)
        ax.axvline(io["cosine"]["mean"], color="k", linestyle="--", linewidth=1)
        ax.set_xlim(_occupied(io["histograms"]["cosine"], 0.05)[0], 1)
        ax.set_yticks([])
        ax.set_ylabel(_describe(result, label), fontsize=8)
        ax.text(0.02, 0.95, f"mean {io['cosine']['mean']:.3f}", transform=ax.transAxes, va="top", fontsize=8)
        ax = axes[r][1]
        _stairs(ax, io["histograms"]["norm_ratio"], color)
        ax.axvline(1.0, color="gray", linewidth=0.8)
        ax.axvline(io["norm_ratio"]["mean"], color="k", linestyle="--", linewidth=1)
        ax.set_xlim(0, max(1.1, _occupied(io["histograms"]["norm_ratio"], 0.1)[1]))
        ax.set_yticks([])
        pos0 = io["norm_ratio"]["pos0"]
        ax.text(0.98, 0.95, f"mean {io['norm_ratio']['mean']:.3f}\npos 0: {pos0:.3f}\npos > 0: "
                f"{io['norm_ratio']['pos_gt_0']:.3f}" if pos0 is not None else f"mean {io['norm_ratio']['mean']:.3f}",
                transform=ax.transAxes, va="top", ha="right", fontsize=8)
        ax = axes[r][2]
        pairs = np.asarray(scatter[label])
        if len(pairs):
            ax.scatter(pairs[:, 0], pairs[:, 1], s=1, alpha=0.15, color=color)
            top = float(np.percentile(pairs, 99.5)) * 1.05
            ax.plot([0, top], [0, top], "k--", linewidth=0.8)
            ax.set_xlim(0, top)
            ax.set_ylim(0, top)
        ax = axes[r][3]
        final = sorted(geo["downstream"])[-1:] if geo["downstream"] else []
        if final:
            drift = geo["downstream"][final[0]]
            _stairs(ax, drift["histograms"]["cosine"], color)
            ax.axvline(drift["cosine"]["mean"], color="k", linestyle="--", linewidth=1)
            ax.set_xlim(_occupied(drift["histograms"]["cosine"], 0.05)[0], 1)
            ax.text(0.02, 0.95, f"mean {drift['cosine']['mean']:.3f}\nnorm ratio {drift['norm_ratio']['mean']:.3f}",
                    transform=ax.transAxes, va="top", fontsize=8)
            if r == 0:
                ax.set_title(f"spliced vs clean at {final[0]}: cosine", fontsize=9)
        else:
            ax.axis("off")
        ax.set_yticks([])
    axes[0][0].set_title("cos(SAE input, SAE output) per token", fontsize=9)
    axes[0][1].set_title("||SAE output|| / ||SAE input|| per token", fontsize=9)
    axes[0][2].set_title("||output|| vs ||input|| (first tokens)", fontsize=9)
    fig.suptitle(f"Activation geometry over {result['tokens']:,} held-out tokens")
    return _save(fig, stem)


def _file_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def draw_all(result: dict, scatter: dict, out: Path, embeddings: dict | None = None) -> list[Path]:
    """Every figure into ``out``; returns the files written. embeddings: {(a, b): [n_a + n_b, 2]}."""
    files = feature_density(result, out / "feature_density")
    files += within_similarity(result, out / "within_sae_similarity")
    files += within_similarity_vs(result, out / "within_sae_similarity_vs_l0") or []
    files += cross_similarity(result, "cross_type", out / "cross_type_similarity", "Cross-type similarity:\neach "
                              "alive latent of A's nearest alive latent of B", "max cosine similarity") or []
    files += cross_similarity(result, "cross_seed", out / "cross_seed_similarity", "Cross-seed similarity:\neach "
                              "alive latent's nearest\nalive latent in the other seed's SAE", "max cosine similarity") or []
    for entry in result["umap"]:
        embedding = (embeddings or {})[(entry["a"], entry["b"])]
        files += umap_figure(result, entry, embedding, out / f"umap_{_file_label(entry['a'])}_vs_{_file_label(entry['b'])}")
    files += activation_geometry(result, scatter, out / "activation_geometry")
    return files
