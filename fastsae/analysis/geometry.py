"""Activation geometry: what an SAE's output looks like next to its input, and how far the model
with the SAE spliced in drifts from the clean model downstream (the paper's activation analysis,
e2e_sae scripts/analysis/activation_analysis.py), with the per-latent statistics of the same pass.

One pass over held-out token batches serves every SAE: per batch one clean run caches the hooks
all SAEs need, then each SAE's spliced run starts from the cached residual of its block (as
the training objective does). Inside the spliced run the SAE's output is its own forward, ``sae(x)``, as
in training and eval; its statistics come from ``sae.encode_sparse(x)`` (every activation's entry
point), so the only code as wide as the dictionary is the one batch's code the forward builds.

A transcoder "IN->OUT" (fastsae.spec.hook_in_out) reads IN and replaces OUT in the spliced run,
as the training objective does: its statistics come from its code of the activation at IN, and
its output is compared with the activation the model computed at OUT (the one it replaces; for an
SAE, its own input): below, x is that target. The result names it ("compared_with").

Per SAE, per token (x the SAE's input, or a transcoder's target; x_hat its output):
    norm ratio  ||x_hat|| / ||x||          (the paper's get_norm_ratios: a mean of per-token
    cosine      cos(x, x_hat)               ratios, reported at position 0 and at positions > 0)
    explained variances, token-weighted means of per-batch values as fastsae's eval:
        explained_variance           x the target (fastsae.train.losses.explained_variance)
        explained_variance_ln        both layer-normed first (e2e_sae's _ln variant)
        explained_variance_out_to_in the paper code's logged local EV: x_hat the target
        explained_variance_out_to_in_ln
and at every downstream hook (blocks.L.hook_resid_pre after the SAE's block, and the final
residual; as the evaluator's reconstruction_hooks) the spliced activation against the clean one: norm
ratio, cosine, MSE, explained variance (clean the target) and its layer-normed variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastsae.analysis.latent_stats import LatentStats
from fastsae.spec import hook_in_out
from fastsae.train import losses
from fastsae.train.evaluator import reconstruction_hooks

COSINE_BINS = 100  # over [-1, 1]
RATIO_BINS, RATIO_MAX = 60, 3.0  # over [0, RATIO_MAX]; larger ratios are counted in the last bin
SCATTER_TOKENS = 20_000  # (||x||, ||x_hat||) pairs kept for the norm scatter plot


def downstream_hooks(lm, hook: str) -> list[str]:
    """Where the spliced run is compared with the clean one for an SAE at ``hook``: the evaluator's
    reconstruction hooks (every later block's hook_resid_pre and the final residual)."""
    return reconstruction_hooks(lm, [hook])


class VectorComparison:
    """Streamed per-token comparison of vectors ``out`` against reference vectors ``ref`` [B, T, d]:
    norm ratio ||out|| / ||ref|| and cosine similarity, their means at position 0, at positions
    > 0 and overall, and fixed-bin histograms over all tokens. Sums in float64 on the device."""

    def __init__(self, device, scatter_tokens: int = 0):
        zeros = lambda: torch.zeros(3, dtype=torch.float64, device=device)  # noqa: E731  pos 0, pos > 0, count
        self.ratio, self.cosine = zeros(), zeros()
        self.cosine_hist = torch.zeros(COSINE_BINS, dtype=torch.int64, device=device)
        self.ratio_hist = torch.zeros(RATIO_BINS, dtype=torch.int64, device=device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # tokens at pos 0, at pos > 0
        self.scatter_tokens = scatter_tokens
        self.scatter: list[torch.Tensor] = []
        self._scattered = 0

    @torch.no_grad()
    def update(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref, out = ref.float(), out.float()
        ref_norm, out_norm = ref.norm(dim=-1), out.norm(dim=-1)  # [B, T]
        ratio = out_norm / ref_norm.clamp_min(1e-30)
        cosine = (ref * out).sum(-1) / (ref_norm * out_norm).clamp_min(1e-30)
        for total, value in ((self.ratio, ratio), (self.cosine, cosine)):
            total[0] += value[:, 0].double().sum()
            total[1] += value[:, 1:].double().sum()
        self.counts[0] += ratio.shape[0]
        self.counts[1] += ratio[:, 1:].numel()
        self._add_hist(self.cosine_hist, cosine, -1.0, 1.0)
        self._add_hist(self.ratio_hist, ratio, 0.0, RATIO_MAX)
        if self._scattered < self.scatter_tokens:
            pairs = torch.stack([ref_norm.reshape(-1), out_norm.reshape(-1)], dim=1)[:self.scatter_tokens - self._scattered]
            self.scatter.append(pairs.cpu())
            self._scattered += len(pairs)

    @staticmethod
    def _add_hist(hist: torch.Tensor, values: torch.Tensor, low: float, high: float) -> None:
        bins = hist.numel()
        index = ((values.reshape(-1) - low) / (high - low) * bins).floor().clamp(0, bins - 1).to(torch.int64)
        hist.index_add_(0, index, torch.ones_like(index))

    def result(self) -> dict:
        counts = self.counts.double().cpu()
        out = {}
        for name, total in (("norm_ratio", self.ratio.cpu()), ("cosine", self.cosine.cpu())):
            out[name] = {"mean": float(total[:2].sum() / counts.sum()),
                         "pos0": float(total[0] / counts[0]) if counts[0] else None,
                         "pos_gt_0": float(total[1] / counts[1]) if counts[1] else None}
        out["histograms"] = {
            "cosine": {"edges": torch.linspace(-1, 1, COSINE_BINS + 1).tolist(), "counts": self.cosine_hist.tolist()},
            "norm_ratio": {"edges": torch.linspace(0, RATIO_MAX, RATIO_BINS + 1).tolist(),
                           "counts": self.ratio_hist.tolist(), "last_bin_includes_larger": True},
        }
        return out

    def scatter_pairs(self) -> torch.Tensor:
        """float32 [n, 2]: (||ref||, ||out||) of the first scatter_tokens tokens."""
        return torch.cat(self.scatter) if self.scatter else torch.zeros(0, 2)


@dataclass
class _Accumulator:
    """Token-weighted sums of per-batch scalars (as Trainer.evaluate averages its metrics)."""

    sums: dict = field(default_factory=dict)
    tokens: int = 0

    def add(self, n_tokens: int, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.double() * n_tokens

    def means(self) -> dict:
        return {key: float(value) / self.tokens for key, value in self.sums.items()}


class SAEGeometry:
    """The activation geometry of one SAE, accumulated batch by batch (see the module docstring)."""

    def __init__(self, hook: str, downstream: list[str], device):
        self.hook = hook
        self.downstream = downstream
        self.io = VectorComparison(device, scatter_tokens=SCATTER_TOKENS)
        self.io_metrics = _Accumulator()
        self.drift = {h: VectorComparison(device) for h in downstream}
        self.drift_metrics = {h: _Accumulator() for h in downstream}

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, clean: dict, captured: dict) -> None:
        n = x.shape[:-1].numel()
        self.io.update(x, x_hat)
        self.io_metrics.tokens += n
        self.io_metrics.add(n, explained_variance=losses.explained_variance(x, x_hat),
                            explained_variance_ln=losses.explained_variance_ln(x, x_hat),
                            explained_variance_out_to_in=losses.explained_variance_out_to_in(x, x_hat),
                            explained_variance_out_to_in_ln=losses.explained_variance_out_to_in(x, x_hat, layer_norm=True),
                            mse=losses.mse_loss(x_hat, x))
        for hook in self.downstream:
            self.drift[hook].update(clean[hook], captured[hook])
            self.drift_metrics[hook].tokens += n
            self.drift_metrics[hook].add(n, explained_variance=losses.explained_variance(clean[hook], captured[hook]),
                                         explained_variance_ln=losses.explained_variance_ln(clean[hook], captured[hook]),
                                         mse=losses.mse_loss(captured[hook], clean[hook]))

    def result(self) -> dict:
        return {
            "hook": self.hook,
            "compared_with": hook_in_out(self.hook)[1],  # the target hook: OUT for a transcoder
            "sae_output_vs_input": {**self.io.result(), "metrics": self.io_metrics.means()},
            "downstream": {hook: {**self.drift[hook].result(), "metrics": self.drift_metrics[hook].means()}
                           for hook in self.downstream},
        }


@torch.no_grad()
def activation_pass(lm, token_batches, saes: dict[str, tuple[str, object]]) -> tuple[dict[str, SAEGeometry],
                                                                                    dict[str, LatentStats]]:
    """One pass over ``token_batches`` (e.g. stream.TokenBatches) for every SAE in ``saes``
    ({name: (hook, E2ESAE)}; a transcoder's hook "IN->OUT"): returns ({name: SAEGeometry},
    {name: LatentStats})."""
    from fastsae.analysis.stream import check_widths

    check_widths(lm, saes, ValueError)
    starts, downstream = {}, {}
    for name, (hook, _) in saes.items():
        try:
            starts[name] = lm.start_point(hook_in_out(hook)[0])
        except ValueError:  # an SAE on the embedding: its spliced run starts from the tokens
            starts[name] = None
        downstream[name] = downstream_hooks(lm, hook)
    cache_hooks = sorted({h for h in starts.values() if h} | {h for hooks in downstream.values() for h in hooks})
    geometry = {name: SAEGeometry(hook, downstream[name], lm.device) for name, (hook, _) in saes.items()}
    stats = {name: LatentStats(sae.n_latents, device=sae.device) for name, (_, sae) in saes.items()}

    for tokens in token_batches:
        _, clean = lm.clean_run(tokens, cache_hooks)
        for name, (hook, sae) in saes.items():
            start = {} if starts[name] is None else {"start_hook": starts[name], "start_acts": clean[starts[name]]}
            seen = {}
            _, captured = lm.spliced_run(tokens, _splice(hook, sae, stats[name], seen),
                                         capture_hooks=downstream[name], **start)
            geometry[name].update(seen["target"], seen["x_hat"], clean, captured)
    return geometry, stats


def _splice(hook: str, sae, stats: LatentStats, seen: dict) -> dict:
    """The spliced run's replacements for one coder: an SAE's output at its hook; a transcoder's
    input recorded at IN (passed on unchanged) and its output at OUT, in place of the activation
    the model computed there (its target). Records "target" and "x_hat" in ``seen``."""
    hook_in, hook_out = hook_in_out(hook)

    def record(acts):
        seen["x"] = acts.to(sae.device, sae.dtype)
        return acts

    def replace(acts):
        target = acts.to(sae.device, sae.dtype)
        x = target if hook_in == hook_out else seen.pop("x")
        stats.update(sae.encode_sparse(x))
        x_hat = sae(x)
        seen["target"], seen["x_hat"] = target, x_hat
        return x_hat.to(acts.device, acts.dtype)

    return {hook_out: replace} if hook_in == hook_out else {hook_in: record, hook_out: replace}
