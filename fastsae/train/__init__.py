"""Training: losses, the Trainer, metrics, checkpoints, config (and the token streams in data.py)."""

from fastsae.train.config import ConfigError, TrainConfig, list_presets, load_config
from fastsae.train.trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "list_presets", "load_config"]
