"""SAEBench's core metrics, in its terms, from fastsae's eval pass (`fastsae eval ... --saebench OUT.json`).

The definitions are sae-bench 0.6.0's (sae_bench/evals/core/main.py: get_recons_loss,
get_sparsity_and_variance_metrics, get_featurewise_weight_based_metrics, calculate_misc_metrics)
and the JSON is its CoreEvalOutput (eval_output.py), which tests validate with sae-bench's own model
where it installs. "Counted tokens" are those whose id is not the tokenizer's pad, eos or bos id,
as SAEBench masks them; the SAE and the ablation still act at every position.

    kl_div_with_sae, kl_div_with_ablation   mean over counted tokens of KL(p_clean || p_sae) and of
        KL(p_clean || p_zero), p_zero the model with the hook's activation set to 0;
        kl_div_score = (kl_ablation - kl_sae) / kl_ablation
    ce_loss_without_sae, _with_sae, _with_ablation   next-token cross-entropy, mean over positions
        that have a next token and whose own token is counted;
        ce_loss_score = (ce_ablation - ce_sae) / (ce_ablation - ce_clean)
    explained_variance   1 - R / (A - B^2): per batch R = mean_t ||x_t - x̂_t||^2, A = mean_t ||x_t||^2
        and B = the mean over dimensions of mean_t x_t,i^2, each then averaged over batches. This is
        0.6.0's formula as written (B is a mean square, not a mean, so A - B^2 is not the variance);
        it is reproduced so that the numbers compare with SAEBench's
    explained_variance_legacy   mean_t [1 - ||x_t - x̂_t||^2 / ||x_t - mean_batch x||^2] (fastsae's
        explained_variance/<hook>, the paper code's formula)
    mse   mean_t ||x_t - x̂_t||^2 / n_b, n_b the counted tokens of t's batch (SAEBench divides each
        token's squared error by its batch's token count, so its mse depends on the batch size;
        fastsae's mse/<hook> is the mean over elements)
    cossim   mean_t cos(x_t, x̂_t)
    l2_norm_in, l2_norm_out, l2_ratio   mean ||x_t||, mean ||x̂_t||, mean ||x̂_t|| / ||x_t|| (a norm
        under 1e-4 divides as 1); relative_reconstruction_bias: per batch mean ||x̂||^2 / mean <x, x̂>
        (Rajamanoharan et al. 2024, eq. 10), averaged over batches
    l0, l1   mean count and mean sum of the code's nonzero entries per token

A transcoder "IN->OUT" is measured as it acts: the ablation zeroes OUT (the activation it replaces),
the reconstruction metrics compare its output with the model's activation at OUT (x above is that
target), and the sparsity metrics read its code of its input, the activation at IN.
    feature_density   per latent, the counted tokens it fires on / counted tokens;
        consistent_activation_heuristic: those tokens / the sequences it fires in
    misc_metrics   frac_alive (density > 0), freq_over_1_percent / _10_percent (share of latents
        above), normalized_freq_over_... (their share of the summed density), and the mean over
        latents of the largest cosine similarity of its encoder column / decoder row with another
        latent's (every latent, dead ones included, as SAEBench)
    eval_result_details   per latent: the densities above, encoder bias and norm, cosine of its
        encoder column and decoder row, the two largest cosines; rounded to 10 decimals
A NaN (the heuristic of a latent that never fired) is written -1, as SAEBench writes it; so is an
infinite value (the largest cosine of a one-latent SAE).

Where it differs from running SAEBench: the tokens are the config's eval split at its context
length and eval batch size (SAEBench reads openwebtext at 128 tokens, 16 prompts a batch), one
pass gives every metric (SAEBench reads separate batches for KL / CE and for the rest), the KL is
exact (SAEBench's log(softmax) is NaN where a probability underflows), and encoder_bias is
fastsae's b_enc (a SAELens b_dec subtraction folded in).

Cost, per batch of N tokens (d_model d, vocabulary V, n latents), on top of the eval's own spliced
pass and its fused KL (4·N·d·V FLOPs: clean and spliced logits): one more spliced pass from the
SAE's block with the hook's activation set to zero (the blocks after the hook, no gradient), two
more fused KL calls (8·N·d·V: the SAE run again under SAEBench's token mask, and the ablated run;
never an N x V tensor), one encode_sparse of the SAE's input (one encoder GEMM, 2·N·d_in·n), and
the code's per-sequence firing set ([sequences, n] booleans). Once per eval: the two largest-cosine
searches over encoder columns and decoder rows (2·n²·d_in each, blocks of at most 2^24 entries).
"""

from __future__ import annotations

import json
import math
import time
import uuid

import torch
import torch.nn.functional as F

from fastsae import ops
from fastsae._version import __version__
from fastsae.train.losses import next_token_labels

DEFINITIONS = "sae-bench 0.6.0 evals/core"
FLOAT_PRECISION = 10  # SAEBench rounds the per-latent metrics to 10 decimals
_IGNORE = -100


def special_token_ids(tokenizer) -> list[int]:
    """The tokenizer's pad, eos and bos ids (the tokens SAEBench leaves out of its means)."""
    if tokenizer is None:
        return []
    ids = {getattr(tokenizer, name, None) for name in ("pad_token_id", "eos_token_id", "bos_token_id")}
    return sorted(int(i) for i in ids if i is not None)


def zero_ablated_hidden(lm, tokens: torch.Tensor, hook: str, start_hook: str | None,
                        start_acts: torch.Tensor | None) -> torch.Tensor:
    """The final hidden state with ``hook``'s activation replaced by zeros (SAEBench's ablation),
    run from the cached residual of the hook's block when ``start_hook`` is given."""
    start = {} if start_hook is None else {"start_hook": start_hook, "start_acts": start_acts}
    hidden, _ = lm.spliced_run(tokens, {hook: torch.zeros_like}, **start)
    return hidden


def max_cosine_with_others(vectors: torch.Tensor) -> torch.Tensor:
    """[n]: each row's largest cosine similarity with another row (itself excluded; a zero row has
    cosine 0 with everything), in blocks of rows so no n x n matrix exists (SAEBench's
    calculate_max_cosine_sim, on rows)."""
    unit = F.normalize(vectors.detach().float(), dim=1)
    n = unit.shape[0]
    out = torch.empty(n, device=unit.device)
    step = max(1, (1 << 24) // max(n, 1))
    for start in range(0, n, step):
        sims = unit[start:start + step] @ unit.T
        rows = torch.arange(sims.shape[0], device=unit.device)
        sims[rows, rows + start] = float("-inf")
        out[start:start + step] = sims.max(dim=1).values
    return out


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1.0


class CoreMetrics:
    """SAEBench's core metrics of one SAE, accumulated batch by batch (see the module docstring).

    special_ids: token ids left out of the means (special_token_ids(tokenizer))."""

    def __init__(self, sae, hook: str, special_ids: list[int]):
        self.sae, self.hook, self.special_ids = sae, hook, list(special_ids)
        self.token_sums: dict[str, float] = {}
        self.batch_sums: dict[str, float] = {}
        self.counted = 0  # counted tokens (the SAE-side means)
        self.tokens = 0  # every token read
        self.batches = 0
        n, device = sae.n_latents, sae.device
        self.fired = torch.zeros(n, dtype=torch.float64, device=device)
        self.fired_sequences = torch.zeros(n, dtype=torch.float64, device=device)

    def _add(self, sums: dict, name: str, value) -> None:
        sums[name] = sums.get(name, 0.0) + float(value)

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor(self.special_ids, dtype=tokens.dtype, device=tokens.device)
        return ~torch.isin(tokens, ids)

    @torch.no_grad()
    def add_batch(self, tokens: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, h_orig: torch.Tensor,
                  h_sae: torch.Tensor, h_ablated: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor | None,
                  softcap: float | None = None, target: torch.Tensor | None = None) -> None:
        """One eval batch: tokens [B, T], the SAE's input x [B, T, d_in] and reconstruction x_hat
        [B, T, d_out], the final hidden states of the clean, spliced and zero-ablated runs [B, T,
        d_model]; target: what x_hat is compared with (a transcoder's: the activation at OUT; None:
        x, an SAE's)."""
        mask = self.token_mask(tokens)
        self.tokens += tokens.numel()
        self.batches += 1
        self._add_downstream(tokens, mask, h_orig, h_sae, h_ablated, W_U, b_U, softcap)
        if bool(mask.any()):
            self._add_reconstruction(mask, x if target is None else target, x_hat)
            self._add_code(mask, x)

    def _add_downstream(self, tokens, mask, h_orig, h_sae, h_ablated, W_U, b_U, softcap) -> None:
        labels = next_token_labels(tokens, _IGNORE).masked_fill(~mask, _IGNORE)
        n_kl, n_ce = int(mask.sum()), int((labels != _IGNORE).sum())
        for name, hidden in (("sae", h_sae), ("ablation", h_ablated)):
            kl_sum, stats = ops.fused_linear_kl(hidden.float(), h_orig.float(), W_U, b_U, mask=mask, labels=labels,
                                                ignore_index=_IGNORE, softcap=softcap, reduction="sum",
                                                return_stats=True)
            self._add(self.token_sums, f"kl_{name}", kl_sum)
            if n_ce:
                self._add(self.token_sums, f"ce_{name}", stats.ce_sae * n_ce)
                if name == "sae":
                    self._add(self.token_sums, "ce_clean", stats.ce_orig * n_ce)
        self._add(self.token_sums, "n_kl", n_kl)
        self._add(self.token_sums, "n_ce", n_ce)

    def _add_reconstruction(self, mask, x, x_hat) -> None:
        sums = self.token_sums
        d = x.shape[-1]
        flat = mask.reshape(-1)
        xm, rm = x.reshape(-1, d)[flat].float(), x_hat.reshape(-1, d)[flat].float()
        n = xm.shape[0]
        resid = (xm - rm).pow(2).sum(-1)
        norm_in, norm_out = xm.norm(dim=-1), rm.norm(dim=-1)
        self._add(sums, "l2_norm_in", norm_in.sum())
        self._add(sums, "l2_norm_out", norm_out.sum())
        self._add(sums, "l2_ratio", (norm_out / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in)).sum())
        self._add(sums, "cossim", ((xm / norm_in[:, None]) * (rm / norm_out[:, None])).sum(-1).sum())
        self._add(sums, "explained_variance_legacy", (1 - resid / (xm - xm.mean(0)).pow(2).sum(-1)).sum())
        self._add(sums, "mse", (resid / n).sum())
        self._add(self.batch_sums, "relative_reconstruction_bias", norm_out.pow(2).mean() / (xm * rm).sum(-1).mean())
        self._add(self.batch_sums, "mean_sum_of_squares", xm.pow(2).sum(-1).mean())
        self._add(self.batch_sums, "mean_square_per_dimension", xm.pow(2).mean(0).mean())
        self._add(self.batch_sums, "mean_sum_of_resid_squared", resid.mean())
        self._add(self.batch_sums, "reconstruction_batches", 1)

    def _add_code(self, mask, x) -> None:
        sums = self.token_sums
        code = self.sae.encode_sparse(x)  # [B, T, width], padded with zeros
        values = code.values.float() * mask[..., None]
        active = values != 0
        self._add(sums, "l0", active.sum())
        self._add(sums, "l1", values.sum())
        firing = values > 0
        ids = code.indices[firing]
        self.fired.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        sequences = torch.arange(values.shape[0], device=ids.device)[:, None, None].expand_as(firing)[firing]
        present = torch.zeros(values.shape[0], self.sae.n_latents, dtype=torch.bool, device=ids.device)
        present[sequences, ids] = True
        self.fired_sequences += present.sum(0)
        self.counted += int(mask.sum())

    def _weight_metrics(self) -> dict[str, torch.Tensor]:
        sae = self.sae
        W_enc, W_dec = sae.W_enc.detach().float(), sae.W_dec.detach().float()  # [d_in, n], [n, d_out]
        # a transcoder with d_out != d_in: its encoder column and decoder row live in different spaces (NaN)
        cosine = (F.cosine_similarity(W_dec, W_enc.T, dim=1) if W_dec.shape[1] == W_enc.shape[0]
                  else torch.full((sae.n_latents,), math.nan, device=W_enc.device))
        return {"encoder_bias": sae.b_enc.detach().float(), "encoder_norm": W_enc.norm(dim=0),
                "encoder_decoder_cosine_sim": cosine,
                "max_encoder_cosine_sim": max_cosine_with_others(W_enc.T),
                "max_decoder_cosine_sim": max_cosine_with_others(W_dec)}

    def metrics(self) -> tuple[dict, list[dict]]:
        """(eval_result_metrics, eval_result_details) in CoreEvalOutput's layout."""
        if not self.counted:
            raise RuntimeError("no counted token: every eval token was a pad / eos / bos token")
        t, b = self.token_sums, self.batch_sums
        kl_sae, kl_abl = t["kl_sae"] / t["n_kl"], t["kl_ablation"] / t["n_kl"]
        ce = {name: t[f"ce_{name}"] / t["n_ce"] if t["n_ce"] else math.nan for name in ("clean", "sae", "ablation")}
        per_token = {name: t[name] / self.counted for name in ("l2_norm_in", "l2_norm_out", "l2_ratio", "cossim",
                                                              "explained_variance_legacy", "mse", "l0", "l1")}
        per_batch = {name: b[name] / b["reconstruction_batches"] for name in
                     ("relative_reconstruction_bias", "mean_sum_of_squares", "mean_square_per_dimension",
                      "mean_sum_of_resid_squared")}
        total_variance = per_batch["mean_sum_of_squares"] - per_batch["mean_square_per_dimension"] ** 2
        density = self.fired / self.counted
        weights = self._weight_metrics()
        total = float(density.sum())
        metrics = {
            "model_behavior_preservation": {"kl_div_score": (kl_abl - kl_sae) / kl_abl,
                                            "kl_div_with_ablation": kl_abl, "kl_div_with_sae": kl_sae},
            "model_performance_preservation": {
                "ce_loss_score": (ce["ablation"] - ce["sae"]) / (ce["ablation"] - ce["clean"]),
                "ce_loss_with_ablation": ce["ablation"], "ce_loss_with_sae": ce["sae"],
                "ce_loss_without_sae": ce["clean"]},
            "reconstruction_quality": {
                "explained_variance": 1 - per_batch["mean_sum_of_resid_squared"] / total_variance,
                "explained_variance_legacy": per_token["explained_variance_legacy"], "mse": per_token["mse"],
                "cossim": per_token["cossim"]},
            "shrinkage": {"l2_norm_in": per_token["l2_norm_in"], "l2_norm_out": per_token["l2_norm_out"],
                          "l2_ratio": per_token["l2_ratio"],
                          "relative_reconstruction_bias": per_batch["relative_reconstruction_bias"]},
            "sparsity": {"l0": per_token["l0"], "l1": per_token["l1"]},
            "token_stats": {"total_tokens_eval_reconstruction": self.tokens,
                            "total_tokens_eval_sparsity_variance": self.tokens},
            "misc_metrics": {
                "freq_over_1_percent": float((density > 0.01).double().mean()),
                "freq_over_10_percent": float((density > 0.1).double().mean()),
                "normalized_freq_over_1_percent": float(density[density > 0.01].sum()) / total if total > 0 else 0.0,
                "normalized_freq_over_10_percent": float(density[density > 0.1].sum()) / total if total > 0 else 0.0,
                "average_max_encoder_cosine_sim": float(weights["max_encoder_cosine_sim"].mean()),
                "average_max_decoder_cosine_sim": float(weights["max_decoder_cosine_sim"].mean()),
                "frac_alive": float((density > 0).double().mean())},
        }
        metrics = {group: {name: value if isinstance(value, int) else _finite(float(value))
                           for name, value in values.items()} for group, values in metrics.items()}
        columns = {"feature_density": density, "consistent_activation_heuristic": self.fired / self.fired_sequences,
                   **weights}
        columns = {name: column.double().cpu().tolist() for name, column in columns.items()}
        details = [{"index": i, **{name: _finite(round(column[i], FLOAT_PRECISION)) for name, column in columns.items()}}
                   for i in range(self.sae.n_latents)]
        return metrics, details

    def output(self, eval_config: dict) -> dict:
        """The CoreEvalOutput record (a JSON-serialisable dict): eval_config (CoreEvalConfig fields),
        the metrics and details, the release and SAE id where the SAE came from a release, its cfg."""
        metrics, details = self.metrics()
        release = self.sae.metadata.get("release") or {}
        return {
            "eval_type_id": "core",
            "eval_config": eval_config,
            "eval_id": str(uuid.uuid4()),
            "datetime_epoch_millis": int(time.time() * 1000),
            "eval_result_metrics": metrics,
            "eval_result_details": details,
            "sae_bench_commit_hash": f"fastsae-{__version__}",
            "sae_lens_id": release.get("sae_id"),
            "sae_lens_release_id": release.get("release"),
            "sae_lens_version": None,
            "sae_cfg_dict": self.sae.cfg.to_dict(),
            "eval_result_unstructured": {
                "computed_by": f"fastsae {__version__}", "definitions": DEFINITIONS, "hook": self.hook,
                "counted_tokens": self.counted, "special_token_ids": self.special_ids, "batches": self.batches},
        }


def core_eval_config(config, n_batches: int, dataset: str | None = None) -> dict:
    """SAEBench's CoreEvalConfig fields for an eval of ``n_batches`` batches under the fastsae
    TrainConfig ``config`` (every metric on, as its core eval runs by default); dataset: what the
    tokens were, default the config's data section as JSON."""
    return {"model_name": config.model.name, "llm_dtype": config.model.dtype,
            "batch_size_prompts": config.eval.batch_size, "n_eval_reconstruction_batches": n_batches,
            "n_eval_sparsity_variance_batches": n_batches,
            "dataset": dataset or json.dumps(config.data_spec(), sort_keys=True, default=str),
            "context_size": config.data.context_length, "compute_kl": True, "compute_ce_loss": True,
            "compute_l2_norms": True, "compute_sparsity_metrics": True, "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": False, "verbose": False}
