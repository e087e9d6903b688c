"""`fastsae analyze`: the paper's geometric and activation analysis of trained SAEs, as one command.

    fastsae analyze runs/sweep-embedded --out analysis          # a sweep: matched runs picked by rule
    fastsae analyze runs/e2e runs/local --out analysis --pair e2e local
    fastsae analyze sae_dir@blocks.6.hook_resid_pre --model gpt2 --config gpt2-e2e --out analysis

    from fastsae.analysis import analyze
    result = analyze(["runs/sweep-embedded"], "analysis")     # the numbers of analysis.json

Over ``n_tokens`` held-out tokens (the eval split of the runs' data), for every SAE: per-latent
statistics (firing frequency, mean and max activation, activation histogram, alive set; saved to
OUT/latent_stats/<sae>/ for the dashboard and later analyses; for a kind whose latents form groups,
Matryoshka's nested prefixes, the groups, in those files' metadata, and each group's alive latents
and L0 in analysis.json and analysis.md), the within-SAE similarity of its
alive decoder directions, and its activation geometry (output vs input, and the spliced model's
drift from the clean one downstream, with the explained-variance variants). Then, among the SAEs
chosen as the paper does (fastsae.analysis.pairs: one local, e2e and e2e+ds SAE of similar CE
increase, and of similar L0) and the pairs given with --pair: cross-type and cross-seed
similarities and a UMAP of each compared pair with the regions only one dictionary covers.

Writes OUT/analysis.json (every number), OUT/analysis.md (a summary), the figures (PNG + SVG, as
`fastsae plot`), OUT/latent_stats/, and OUT/similarities.safetensors (per-latent maxima and
nearest-latent ids, alive ids, UMAP coordinates). Everything is computed and drawn in a staging
directory first and moved into OUT only when all of it succeeded: an error leaves OUT as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastsae.analysis import pairs as pairing
from fastsae.analysis.geometry import activation_pass
from fastsae.analysis.latent_stats import LatentStats, latent_groups, sae_fingerprint
from fastsae.analysis.similarity import (DEFAULT_BLOCK, bootstrap_mean_ci, bootstrap_mean_difference_ci,
                                         decoder_directions, histogram, max_cosine_similarity, resolve_precision)
from fastsae.analysis.stream import (AnalysisError, TokenBatches, check_widths, held_out_batches,
                                     load_language_model, load_targets, resolve_device)
from fastsae.analysis.umap_regions import exclusive_regions, require_umap, umap_embedding

SIMILARITY_BINS = 50  # histogram bins over [0, 1] in the JSON (max cosines of alive directions)
SHARE_THRESHOLDS = (0.5, 0.7, 0.9)
MATPLOTLIB_EXTRA = "matplotlib is needed for the figures: pip install 'fastsae[analysis]'"


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from fastsae.analysis.umap_regions import MissingExtraError

        raise MissingExtraError(MATPLOTLIB_EXTRA) from None


def _similarity_summary(values: np.ndarray, seed: int) -> dict:
    ci = bootstrap_mean_ci(values, seed=seed)
    return {"mean": ci["mean"], "ci95": [ci["low"], ci["high"]], "n": ci["n"],
            "median": float(np.median(values)),
            "share_above": {f"{t:g}": float((values > t).mean()) for t in SHARE_THRESHOLDS},
            "histogram": histogram(values, SIMILARITY_BINS, (0.0, 1.0))}


def _frequency_histogram(stats: LatentStats, low: float) -> dict:
    """log10 firing frequency of the alive latents in 0.2-wide bins from ``low`` to 0; dead counted apart."""
    log_freq = stats.frequency[stats.alive].log10().cpu().numpy()
    edges = np.arange(low, 0.0 + 1e-9, 0.2)
    counts, edges = np.histogram(np.clip(log_freq, low, 0.0), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": stats.n_latents - stats.n_alive}


def _safe_name(label: str) -> str:
    return label.replace("/", "__").replace("@", "_at_").replace(os.sep, "__")


def analyze(specs, out, *, n_tokens: int = 1_000_000, model: str | None = None, config: str | None = None,
            overrides=(), pairs=(), umap: bool = True, device=None, precision: str = "auto",
            block: int = DEFAULT_BLOCK, split: str = "eval", seed: int = 0, log=print) -> dict:
    """Run the whole analysis (see the module docstring) and write it to ``out``; returns the JSON's dict.

    specs: run directories, sweep directories or SAE paths (PATH[@HOOK]); model, config, overrides:
    as `fastsae eval --sae` (fastsae.analysis.stream.load_targets). pairs: [(label_a, label_b)]
    compared besides the matched ones. umap: draw the UMAPs (needs umap-learn). precision, block:
    of the similarity GEMMs (fastsae.analysis.similarity). split: the data split read ("eval").
    seed: of the bootstrap and the UMAP.
    """
    started = time.perf_counter()
    _require_matplotlib()
    if umap:
        require_umap()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} exists and is not a directory")
    inputs = load_targets(specs, model=model, config=config, overrides=overrides, device=device)
    targets = {t.label: t for t in inputs.targets}
    explicit = _given_pairs(inputs, pairs)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    log(f"fastsae analyze: {len(targets)} SAE(s) on {inputs.config.model.name}; loading the model")
    lm = _checked_model(inputs, targets, device)
    batches, geometry, stats, stream_seconds = _stream(lm, inputs, targets, n_tokens, split, log)

    alive_ids = {label: stats[label].alive.nonzero().squeeze(1).to(targets[label].sae.device) for label in targets}
    arrays: dict[str, torch.Tensor] = {}  # what OUT/similarities.safetensors holds
    t0 = time.perf_counter()
    saes_json = _within_similarities(targets, stats, geometry, alive_ids, arrays, batches.tokens,
                                     block=block, precision=precision, seed=seed)
    within_seconds = time.perf_counter() - t0

    matched = {rule: pairing.matched_sets(list(targets.values()), rule) for rule in pairing.RULES}
    notes = list(inputs.notes) + _notes(targets, matched, batches, split, n_tokens)
    objective_differences = _objective_differences(matched, arrays, seed)
    t0 = time.perf_counter()
    cross_type_json, cross_seed_json = _cross_similarities(targets, matched, explicit, alive_ids, arrays,
                                                           block=block, precision=precision, seed=seed)
    cross_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    umap_json = _umaps(targets, matched, explicit, alive_ids, arrays, seed, log) if umap else []
    umap_seconds = time.perf_counter() - t0

    result = {
        "fastsae_analysis": 1,
        "model": inputs.config.model.name,
        "data": {"spec": inputs.config.data_spec(), "context_length": inputs.config.data.context_length,
                 "split": split},
        "tokens": batches.tokens,
        "tokens_asked": n_tokens,
        "device": str(device),
        "similarity_precision": precision,
        "saes": saes_json,
        "matched": matched,
        "within_objective_differences": objective_differences,
        "cross_type": cross_type_json,
        "cross_seed": cross_seed_json,
        "umap": umap_json,
        "notes": notes,
        "seconds": {"stream": stream_seconds, "within_similarity": within_seconds, "cross_similarity": cross_seconds,
                    "umap": umap_seconds},
    }
    _write_outputs(out, result, targets, stats, geometry, arrays, inputs, split, log)
    result["seconds"]["total"] = time.perf_counter() - started
    log(f"analysis written to {out} in {result['seconds']['total']:.0f} s")
    return result


def _given_pairs(inputs, pairs) -> list[pairing.Pair]:
    """The pairs given with --pair, checked to name comparable SAEs."""
    explicit = []
    for a, b in pairs:
        ta, tb = inputs.by_label(a), inputs.by_label(b)
        pairing.check_comparable(ta, tb)
        explicit.append(pairing.Pair(a, b, "given"))
    return explicit


def _checked_model(inputs, targets: dict, device):
    """The language model the SAEs read, checked to have each SAE's hook at its width."""
    lm = load_language_model(inputs.config, device)
    check_widths(lm, {label: (t.hook, t.sae) for label, t in targets.items()})  # a transcoder's IN and OUT too
    return lm


def _stream(lm, inputs, targets: dict, n_tokens: int, split: str, log):
    """One pass over the held-out tokens: (batches, activation geometry, latent statistics, seconds).
    Raises where an SAE has no alive latent."""
    batches = TokenBatches(held_out_batches(lm, inputs.config, split=split), n_tokens, device=lm.device)
    log(f"streaming up to {n_tokens:,} {split} tokens through {len(targets)} SAE(s)")
    t0 = time.perf_counter()
    for target in targets.values():  # the inference code (BatchTopK, Matryoshka: the threshold, not a batch selection)
        target.sae.eval()
    geometry, stats = activation_pass(lm, batches, {label: (t.hook, t.sae) for label, t in targets.items()})
    stream_seconds = time.perf_counter() - t0
    log(f"  {batches.tokens:,} tokens in {stream_seconds:.0f} s" + (" (the held-out data ran out)" if batches.ran_out else ""))
    for label, s in stats.items():
        if s.n_alive == 0:
            raise AnalysisError(f"{label} has no alive latent on the {batches.tokens:,} held-out tokens: "
                                "nothing fires, so there are no directions to compare")
    return batches, geometry, stats, stream_seconds


def _within_similarities(targets: dict, stats: dict, geometry: dict, alive_ids: dict, arrays: dict, tokens_read: int,
                         *, block: int, precision: str, seed: int) -> dict:
    """Each SAE's entry of analysis.json: what it is, its latent statistics, the similarity of its
    alive decoder directions (their maxima and nearest latents also into ``arrays``) and its
    activation geometry."""
    saes_json = {}
    for label, target in targets.items():
        ids = alive_ids[label]
        arrays[f"alive_ids/{label}"] = ids.cpu()
        entry = {"hook": target.hook, "origin": target.origin, "objective": target.objective,
                 "sparsity_coeff": target.sparsity_coeff, "seed": target.seed, "step": target.step,
                 "d_in": target.sae.d_in, "d_out": target.sae.d_out, "n_latents": target.sae.n_latents,
                 "activation": target.sae.activation,
                 "eval": None if target.eval is None else {
                     name: target.eval_metric(name) for name in ("l0", "ce_increase", "kl", "alive", "explained_variance")},
                 "latent_stats": {**stats[label].summary(),
                                  "l0": float(stats[label].count.sum()) / max(stats[label].n_tokens, 1),
                                  "files": f"latent_stats/{_safe_name(label)}"}}
        groups = latent_groups(target.sae)
        if groups is not None:  # a kind with groups of latents (Matryoshka's nested prefixes)
            entry["latent_groups"] = stats[label].group_summary(groups)
        if len(ids) >= 2:
            values, nearest = max_cosine_similarity(decoder_directions(target.sae, ids), block=block, precision=precision)
            arrays[f"within/{label}/max_cosine"] = values.cpu()
            arrays[f"within/{label}/nearest_latent"] = ids[nearest].cpu()
            entry["within_similarity"] = _similarity_summary(values.cpu().numpy(), seed)
        else:
            entry["within_similarity"] = None
        entry["activation_geometry"] = geometry[label].result()
        saes_json[label] = entry
    low = math.floor(math.log10(1 / max(tokens_read, 1)))
    for label in targets:
        saes_json[label]["latent_stats"]["log10_frequency_histogram"] = _frequency_histogram(stats[label], low)
    return saes_json


def _notes(targets: dict, matched: dict, batches, split: str, n_tokens: int) -> list[str]:
    """What the reader should know of the data read and the matching."""
    notes = []
    if batches.ran_out:
        notes.append(f"the {split} data ran out after {batches.tokens:,} tokens ({n_tokens:,} asked)")
    if not matched["ce"]:
        notes.append("no matched set: the SAEs lack eval.json or objectives (local / e2e / e2e+ds) to match by CE "
                     "and L0")
    without_eval = sorted(label for label, t in targets.items() if t.run_dir is not None and t.eval is None)
    if without_eval:
        notes.append(f"without eval.json, left out of the matching: {', '.join(without_eval)}")
    return notes


def _objective_differences(matched: dict, arrays: dict, seed: int) -> list[dict]:
    """In each matched set, the mean within-SAE similarity of local minus that of e2e and e2e+ds."""
    objective_differences = []
    for group in matched["ce"] + matched["l0"]:
        chosen = group["targets"]
        if "local" not in chosen:
            continue
        for other in ("e2e", "e2e+ds"):
            if other in chosen and f"within/{chosen['local']}/max_cosine" in arrays \
                    and f"within/{chosen[other]}/max_cosine" in arrays:
                diff = bootstrap_mean_difference_ci(arrays[f"within/{chosen['local']}/max_cosine"].numpy(),
                                                    arrays[f"within/{chosen[other]}/max_cosine"].numpy(), seed=seed)
                objective_differences.append({"rule": group["rule"], "hook": group["hook"], "minus": other,
                                              "local": chosen["local"], "other": chosen[other],
                                              "difference": diff["difference"], "ci95": [diff["low"], diff["high"]]})
    return objective_differences


def _cross_similarities(targets: dict, matched: dict, explicit: list, alive_ids: dict, arrays: dict,
                        *, block: int, precision: str, seed: int) -> tuple[list[dict], list[dict]]:
    """The cross-type pairs (the matched sets' and the given ones) and the cross-seed pairs: each
    pair's similarity summary (maxima and nearest latents also into ``arrays``), each pair computed once."""
    cross_type = pairing.cross_type_pairs(matched["ce"] + matched["l0"]) + explicit
    ce_labels = [label for group in matched["ce"] for label in group["targets"].values()]
    cross_seed = pairing.cross_seed_pairs(list(targets.values()), ce_labels)
    computed: dict[tuple[str, str], dict] = {}

    def cross(pair: pairing.Pair) -> dict:
        key = (pair.a, pair.b)
        if key not in computed:
            ta, tb = targets[pair.a], targets[pair.b]
            pairing.check_comparable(ta, tb)
            ids_a, ids_b = alive_ids[pair.a], alive_ids[pair.b].to(ta.sae.device)
            values, nearest = max_cosine_similarity(decoder_directions(ta.sae, ids_a),
                                                    decoder_directions(tb.sae, ids_b).to(ta.sae.device),
                                                    block=block, precision=precision)
            arrays[f"cross/{pair.a}/{pair.b}/max_cosine"] = values.cpu()
            arrays[f"cross/{pair.a}/{pair.b}/nearest_latent"] = ids_b[nearest].cpu()
            computed[key] = _similarity_summary(values.cpu().numpy(), seed)
        return {"a": pair.a, "b": pair.b, "reason": pair.reason, **computed[key]}

    return [cross(p) for p in cross_type], [cross(p) for p in cross_seed]


def _umaps(targets: dict, matched: dict, explicit: list, alive_ids: dict, arrays: dict, seed: int, log) -> list[dict]:
    """UMAPs of e2e and e2e+ds against local at similar CE increase (the paper's) and of the given
    pairs, with the regions only one dictionary covers (coordinates also into ``arrays``)."""
    umap_json = []
    umap_pairs = [p for p in pairing.cross_type_pairs(matched["ce"]) if targets[p.b].objective == "local"] + explicit
    for pair in dict.fromkeys(umap_pairs):
        ta, tb = targets[pair.a], targets[pair.b]
        ids_a, ids_b = alive_ids[pair.a], alive_ids[pair.b]
        log(f"UMAP of {pair.a} ({len(ids_a):,} alive) and {pair.b} ({len(ids_b):,} alive)")
        embedding = umap_embedding(decoder_directions(ta.sae, ids_a), decoder_directions(tb.sae, ids_b), seed=seed)
        arrays[f"umap/{pair.a}/{pair.b}"] = torch.from_numpy(embedding)
        regions = exclusive_regions(embedding, len(ids_a))
        for letter, region in zip(_letters(), regions):
            region["letter"] = letter
            owner_ids = (ids_a if region["owner"] == 0 else ids_b).cpu()
            region["sae"] = pair.a if region["owner"] == 0 else pair.b
            region["latents"] = owner_ids[region.pop("members")].tolist()
            del region["owner"]
        umap_json.append({"a": pair.a, "b": pair.b, "reason": pair.reason, "n_a": len(ids_a), "n_b": len(ids_b),
                          "regions": regions})
    return umap_json


def _letters():
    for i in range(10_000):
        yield (chr(ord("A") + i % 26) + (str(i // 26) if i >= 26 else ""))


def _write_outputs(out: Path, result: dict, targets, stats, geometry, arrays, inputs, split, log) -> None:
    """Draw and write everything into a staging directory beside ``out``, then move it in."""
    from safetensors.torch import save_file

    from fastsae.analysis import figures, report
    from fastsae._files import honour_umask

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.analysis-", dir=out.parent))
    try:
        honour_umask(stage, directory=True)
        for label, target in targets.items():
            stats[label].save(stage / "latent_stats" / _safe_name(label), metadata={
                "label": label, "hook": target.hook, "origin": target.origin, "objective": target.objective,
                "sae_fingerprint": sae_fingerprint(target.sae), "latent_groups": latent_groups(target.sae),
                "model": inputs.config.model.name,
                "data": {"spec": inputs.config.data_spec(), "context_length": inputs.config.data.context_length,
                         "split": split}})
        save_file({k: v.contiguous() for k, v in arrays.items()}, str(stage / "similarities.safetensors"))
        embeddings = {(e["a"], e["b"]): arrays[f"umap/{e['a']}/{e['b']}"].numpy() for e in result["umap"]}
        files = figures.draw_all(result, {label: g.io.scatter_pairs() for label, g in geometry.items()}, stage,
                                 embeddings)
        result["files"] = sorted(str(p.relative_to(stage)) for p in files) + [
            "analysis.json", "analysis.md", "similarities.safetensors", "latent_stats/"]
        (stage / "analysis.md").write_text(report.markdown(result))
        (stage / "analysis.json").write_text(json.dumps(_finite(result), indent=2, allow_nan=False))
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                honour_umask(path)
        out.mkdir(exist_ok=True)
        for path in sorted(stage.rglob("*")):  # whole files replace whole files (os.replace is atomic)
            target = out / path.relative_to(stage)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _finite(value):
    """The result as plain JSON: NaN and infinities become null, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
