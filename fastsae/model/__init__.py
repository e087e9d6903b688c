"""The model side of e2e SAE training: splicing into TransformerLens, and the embedded default model."""

from fastsae.model.embedded import EmbeddedConfig, embedded_corpus, ensure_embedded_model
from fastsae.model.lm import LanguageModel

__all__ = ["LanguageModel", "EmbeddedConfig", "embedded_corpus", "ensure_embedded_model"]
