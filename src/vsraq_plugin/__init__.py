"""vsraq-plugin: routing-aware GPTQ (VSRAQ) for Mixture-of-Experts language models.

The output of every method is an ordinary GPTQ v1 checkpoint; the routing terms act at calibration time only.
"""

from .config import ConfigError, QuantConfig
from .gptq import HessianAccumulator, HessianError, gptq_quantize
from .packing import dequantize_packed, pack_linear, unpack_linear
from .quantizer import QuantizedWeight, rtn

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "HessianAccumulator",
    "HessianError",
    "QuantConfig",
    "QuantizedWeight",
    "__version__",
    "dequantize_packed",
    "gptq_quantize",
    "pack_linear",
    "rtn",
    "unpack_linear",
]
