"""analysis.md: the numbers of analysis.json as a readable summary."""

from __future__ import annotations


def _f(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ci(summary: dict | None) -> str:
    if not summary:
        return ""
    low, high = summary["ci95"]
    return f"{summary['mean']:.3f} [{low:.3f}, {high:.3f}]"


def markdown(result: dict) -> str:
    """analysis.md from analyze's result: its sections in order."""
    lines = []
    for section in (_introduction, _saes, _latent_groups, _matched, _within_differences, _cross_similarities,
                    _umaps, _downstream_drift, _time_and_files):
        lines += section(result)
    return "\n".join(lines)


def _introduction(result: dict) -> list[str]:
    lines = [f"# SAE analysis: {result['model']}", ""]
    spec = result["data"]["spec"]  # analysis.json files written before data.source name it kind
    lines.append(f"{result['tokens']:,} held-out tokens ({result['data']['split']} split of "
                 f"{spec.get('source', spec.get('kind'))} data, context {result['data']['context_length']}); "
                 f"similarities in {result['similarity_precision']} on {result['device']}. "
                 "Similarities are between the decoder directions of alive latents (fired at least once on "
                 "these tokens); each latent's largest cosine similarity, mean with a 95% bootstrap CI.")
    for note in result["notes"]:
        lines.append(f"\nNote: {note}.")
    return lines


def _saes(result: dict) -> list[str]:
    lines = ["", "## SAEs", "",
             "| SAE | objective | sparsity | L0 (eval) | CE increase | alive here | within-SAE max cos | "
             "norm ratio out/in | cos(in, out) | EV | EV ln | EV out_to_in | EV out_to_in ln |",
             "|---" * 13 + "|"]
    for label, sae in result["saes"].items():
        stats = sae["latent_stats"]
        io = sae["activation_geometry"]["sae_output_vs_input"]
        m = io["metrics"]
        ev = sae["eval"] or {}
        lines.append(f"| {label} | {sae['objective'] or ''} | {_f(sae['sparsity_coeff'], 2)} | {_f(ev.get('l0'), 1)} | "
                     f"{_f(ev.get('ce_increase'), 4)} | {stats['alive']:,} / {sae['n_latents']:,} | "
                     f"{_ci(sae['within_similarity'])} | {_f(io['norm_ratio']['mean'])} | {_f(io['cosine']['mean'])} | "
                     f"{_f(m['explained_variance'])} | {_f(m['explained_variance_ln'])} | "
                     f"{_f(m['explained_variance_out_to_in'])} | {_f(m['explained_variance_out_to_in_ln'])} |")
    lines += ["", "EV: explained variance with the SAE input as the target (a transcoder's IN->OUT: the activation "
              "at OUT it replaces; fastsae's `explained_variance`); "
              "EV ln: both layer-normed first; EV out_to_in: the paper code's logged local EV, with the SAE "
              "output as the target (`calc_explained_variance(input, output)`). Norm ratio and cosine: means "
              "over tokens of per-token values."]
    return lines


def _latent_groups(result: dict) -> list[str]:
    grouped = {label: sae["latent_groups"] for label, sae in result["saes"].items() if sae.get("latent_groups")}
    if not grouped:
        return []
    lines = ["", "## Groups of latents (Matryoshka's nested prefixes)", "",
             "A latent's group is the first prefix of the dictionary that holds it; every larger prefix "
             "holds it too. L0: the group's active latents per token.", "",
             "| SAE | group | latents | alive here | L0 |", "|---|---|---|---|---|"]
    for label, groups in grouped.items():
        for g in groups:
            lines.append(f"| {label} | {g['label']} | {g['first']:,}..{g['end'] - 1:,} | {g['alive']:,} / "
                         f"{g['latents']:,} | {_f(g['l0'], 2)} |")
    return lines


def _matched(result: dict) -> list[str]:
    lines = []
    for rule in ("ce", "l0"):
        for group in result["matched"][rule]:
            values = ", ".join(f"{objective} {label} ({group['values'][objective]:.4g})"
                               for objective, label in group["targets"].items())
            lines += ["", f"Matched by similar {'CE increase' if rule == 'ce' else 'L0'} at {group['hook']} "
                      f"(seed {group['seed']}): {values}."]
    return lines


def _within_differences(result: dict) -> list[str]:
    if not result["within_objective_differences"]:
        return []
    lines = ["", "## Within-SAE similarity: local minus the others", "",
             "| matched by | local | other | mean difference | 95% CI |", "|---|---|---|---|---|"]
    for d in result["within_objective_differences"]:
        lines.append(f"| {d['rule'].upper()} | {d['local']} | {d['other']} ({d['minus']}) | {d['difference']:.3f} | "
                     f"[{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] |")
    return lines


def _cross_similarities(result: dict) -> list[str]:
    lines = []
    for key, title in (("cross_type", "Cross-type similarity"), ("cross_seed", "Cross-seed similarity")):
        if not result[key]:
            continue
        lines += ["", f"## {title}", "", "| A -> B | why | mean max cos [95% CI] | median | share > 0.5 | "
                  "share > 0.9 |", "|---|---|---|---|---|---|"]
        for e in result[key]:
            lines.append(f"| {e['a']} -> {e['b']} | {e['reason']} | {_ci(e)} | {e['median']:.3f} | "
                         f"{e['share_above']['0.5']:.3f} | {e['share_above']['0.9']:.3f} |")
    return lines


def _umaps(result: dict) -> list[str]:
    lines = []
    for entry in result["umap"]:
        lines += ["", f"## UMAP: {entry['a']} ({entry['n_a']:,} alive) and {entry['b']} ({entry['n_b']:,} alive)", ""]
        if not entry["regions"]:
            lines.append("No region where only one SAE has latents (every latent has a latent of the other SAE "
                         "among its 15 nearest neighbours in the map).")
        else:
            lines += ["Regions where only one SAE has latents (each latent's 15 nearest neighbours in the map are "
                      "all of its own SAE); latent ids in analysis.json:", "",
                      "| region | SAE | latents | first ids |", "|---|---|---|---|"]
            for region in entry["regions"]:
                ids = ", ".join(map(str, region["latents"][:12])) + (" ..." if len(region["latents"]) > 12 else "")
                lines.append(f"| {region['letter']} | {region['sae']} | {region['size']} | {ids} |")
    return lines


def _downstream_drift(result: dict) -> list[str]:
    lines = ["", "## Downstream drift (spliced run vs clean run)", "",
             "| SAE | hook | cosine | norm ratio | MSE | EV | EV ln |", "|---|---|---|---|---|---|---|"]
    for label, sae in result["saes"].items():
        for hook, drift in sae["activation_geometry"]["downstream"].items():
            m = drift["metrics"]
            lines.append(f"| {label} | {hook} | {_f(drift['cosine']['mean'])} | {_f(drift['norm_ratio']['mean'])} | "
                         f"{_f(m['mse'], 4)} | {_f(m['explained_variance'])} | {_f(m['explained_variance_ln'])} |")
    return lines


def _time_and_files(result: dict) -> list[str]:
    seconds = result["seconds"]
    return ["", f"Time: streaming {seconds['stream']:.0f} s, within-SAE similarity {seconds['within_similarity']:.0f} s, "
            f"cross similarity {seconds['cross_similarity']:.0f} s, UMAP {seconds['umap']:.0f} s.",
            "", "Files: " + ", ".join(result.get("files", [])), ""]
