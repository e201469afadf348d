"""The VWN MoE language model: over-width embedding, GHC-wrapped transformer, reduce head, MTP."""

from harness.model import accounting
from harness.model.config import ModelConfig
from harness.model.transformer import LanguageModel, ModelOutput

__all__ = ["LanguageModel", "ModelConfig", "ModelOutput", "accounting"]
