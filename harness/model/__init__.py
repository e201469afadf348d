"""The VWN MoE language model: over-width embedding, GHC-wrapped transformer, reduce head, MTP."""

from harness.model.config import ModelConfig

__all__ = ["ModelConfig"]
