"""Modules that compute with GPTQ v1 packed weights: ``QuantLinear`` and ``QuantExperts``."""

from .experts import QuantExperts
from .linear import QuantLinear

__all__ = ["QuantExperts", "QuantLinear"]
