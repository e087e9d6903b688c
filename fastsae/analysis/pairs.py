"""Which SAEs to compare: the paper's matched runs, chosen from a sweep's eval.json.

The paper compares one local, one e2e and one e2e+ds SAE per layer that have a similar CE loss
increase (its SIMILAR_CE_RUNS), and another such set with a similar L0 (SIMILAR_L0_RUNS), picked
by hand from its sweeps. Here the same rule is applied to the runs given: among the runs with an
eval.json, of one hook and one seed, the set with one run per objective whose values (CE increase, or
L0) are closest together on a log scale (the smallest max/min ratio; ties to the lower seed, then
the lower values). Cross-seed pairs are the two lowest seeds of each matched run's objective and
sparsity coefficient.

Comparisons, as the paper's (A -> B: for every alive latent of A, its nearest latent of B):
e2e -> local, e2e+ds -> local, and e2e -> e2e+ds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from fastsae.analysis.stream import AnalysisError, SAETarget
from fastsae.train.metrics import OBJECTIVES

CROSS_TYPE = (("e2e", "local"), ("e2e+ds", "local"), ("e2e", "e2e+ds"))
RULES = {"ce": "ce_increase", "l0": "l0"}


@dataclass(frozen=True)
class Pair:
    """Compare SAE ``a`` with SAE ``b`` (labels); ``reason`` says how the pair was chosen."""

    a: str
    b: str
    reason: str


def _value(target: SAETarget, metric: str) -> float | None:
    value = target.eval_metric(metric)
    return value if value is not None and value > 0 and math.isfinite(value) else None


def matched_sets(targets: list[SAETarget], rule: str) -> list[dict]:
    """Per hook: the matched set {objective: target} under ``rule`` ("ce" or "l0"), with its spread.

    Returns [{"rule", "hook", "seed", "targets": {objective: label}, "values": {objective: value}, "spread"}].
    """
    metric = RULES[rule]
    found = []
    hooks = sorted({t.hook for t in targets})
    for hook in hooks:
        best = None
        seeds = sorted({t.seed for t in targets if t.hook == hook and t.objective in OBJECTIVES and t.seed is not None})
        for seed in seeds:
            by_objective = {objective: [t for t in targets if t.hook == hook and t.objective == objective
                                        and t.seed == seed and _value(t, metric) is not None]
                            for objective in OBJECTIVES}
            objectives = [objective for objective in OBJECTIVES if by_objective[objective]]
            if len(objectives) < 2:
                continue
            for combo in itertools.product(*(by_objective[objective] for objective in objectives)):
                values = [_value(t, metric) for t in combo]
                spread = math.log(max(values) / min(values))
                key = (round(spread, 12), seed, sorted(values))
                if best is None or key < best[0]:
                    best = (key, seed, dict(zip(objectives, combo)))
        if best is not None:
            (spread, _, _), seed, chosen = best
            found.append({"rule": rule, "hook": hook, "seed": seed,
                          "targets": {objective: t.label for objective, t in chosen.items()},
                          "values": {objective: _value(t, metric) for objective, t in chosen.items()},
                          "spread_log_ratio": spread})
    return found


def cross_type_pairs(matched: list[dict]) -> list[Pair]:
    """e2e -> local, e2e+ds -> local, e2e -> e2e+ds within each matched set."""
    pairs = []
    for group in matched:
        chosen = group["targets"]
        for a, b in CROSS_TYPE:
            if a in chosen and b in chosen:
                pairs.append(Pair(chosen[a], chosen[b], f"{a} -> {b}, similar {group['rule'].upper()}"))
    return pairs


def _run_key(t: SAETarget) -> tuple:
    """What makes two runs the same but for the seed: objective, coefficient, k (a TopK sweep's
    value, its coefficient 0), hook."""
    return t.objective, t.sparsity_coeff, getattr(t.sae, "k", None), t.hook


def cross_seed_pairs(targets: list[SAETarget], labels: list[str]) -> list[Pair]:
    """For each SAE in ``labels``: its run (objective, coefficient, k, hook) at the two lowest seeds."""
    pairs, done = [], set()
    by_label = {t.label: t for t in targets}
    for label in labels:
        t = by_label[label]
        key = _run_key(t)
        if key in done or t.objective is None:
            continue
        done.add(key)
        group = sorted((u for u in targets if _run_key(u) == key and u.seed is not None),
                       key=lambda u: u.seed)
        if len(group) >= 2:
            pairs.append(Pair(group[0].label, group[1].label,
                              f"{t.objective} seed {group[0].seed} -> seed {group[1].seed}, "
                              f"sparsity {t.sparsity_coeff:g}"))
    return pairs


def check_comparable(a: SAETarget, b: SAETarget) -> None:
    """Two SAEs can be compared only where they read (and, transcoders, write) the same hooks with the
    same widths: a transcoder's hook "IN->OUT" names both."""
    if a.label == b.label:
        raise AnalysisError(f"--pair {a.label} {b.label}: an SAE compared with itself")
    if a.hook != b.hook:
        raise AnalysisError(f"--pair {a.label} {b.label}: they read different hooks ({a.hook} vs {b.hook})")
    if a.sae.d_in != b.sae.d_in:
        raise AnalysisError(f"--pair {a.label} {b.label}: different d_in ({a.sae.d_in} vs {b.sae.d_in})")
    if a.sae.d_out != b.sae.d_out:  # decoder directions live in the space they write
        raise AnalysisError(f"--pair {a.label} {b.label}: different d_out ({a.sae.d_out} vs {b.sae.d_out})")
