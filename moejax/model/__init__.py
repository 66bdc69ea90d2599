"""The MoE language model (Flax NNX)."""
from moejax.model.transformer import Transformer

__all__ = ["Transformer"]
