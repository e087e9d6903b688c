"""fastsae.analysis: what trained SAEs learned (the second half of Braun et al. 2024), and the
pieces `fastsae analyze` and `fastsae dashboard` share.

    from fastsae.analysis import analyze
    analyze(["runs/sweep-embedded"], "analysis")          # figures, analysis.json, analysis.md

    stream.py        load_targets (runs, sweeps, SAE files), held-out token batches, ActivationStream
    latent_stats.py  LatentStats: per-latent firing counts, activations, histograms, streamed and merged
    similarity.py    blocked max / top-k cosine similarity of decoder directions; bootstrap CIs
    geometry.py      activation geometry: SAE output vs input, spliced vs clean run downstream
    pairs.py         the paper's matched runs (similar CE increase, similar L0) and seed pairs
    umap_regions.py  UMAP of two dictionaries (umap-learn) and the regions only one of them covers
    pipeline.py      analyze(): the whole analysis, written atomically; figures.py and report.py draw, summarise

The submodules import lazily: `fastsae.analysis.stream` and `.latent_stats` need only torch.
"""

from fastsae.analysis.latent_stats import LatentStats, collect_latent_stats, sae_fingerprint
from fastsae.analysis.similarity import max_cosine_similarity, nearest_latents
from fastsae.analysis.stream import (ActivationBatch, ActivationStream, AnalysisError, AnalysisInputs, SAETarget,
                                     TokenBatches, held_out_batches, load_language_model, load_targets)



def __getattr__(name):
    if name == "analyze":  # fastsae.analysis.pipeline.analyze; it imports the trainer's losses (seconds)
        from fastsae.analysis.pipeline import analyze

        return analyze
    raise AttributeError(f"module 'fastsae.analysis' has no attribute {name!r}")


__all__ = ["ActivationBatch", "ActivationStream", "AnalysisError", "AnalysisInputs", "LatentStats", "SAETarget",
           "TokenBatches", "analyze", "collect_latent_stats", "held_out_batches", "load_language_model",
           "load_targets", "max_cosine_similarity", "nearest_latents", "sae_fingerprint"]
