"""vsraq-plugin: routing-aware GPTQ (VSRAQ) for Mixture-of-Experts language models.

The output of every method is an ordinary GPTQ v1 checkpoint; the routing terms act at calibration time only.
"""

from .config import ConfigError, QuantConfig
from .gptq import HessianAccumulator, HessianError, gptq_quantize
from .packing import dequantize_packed, pack_linear, unpack_linear
from .quantizer import QuantizedWeight, rtn

__version__ = "0.1.0"

from .api import load, quantize
from .integrations import install as _install_hooks

_install_hooks()

__all__ = [
    "ConfigError",
    "HessianAccumulator",
    "HessianError",
    "QuantConfig",
    "QuantizedWeight",
    "__version__",
    "dequantize_packed",
    "gptq_quantize",
    "load",
    "pack_linear",
    "quantize",
    "rtn",
    "unpack_linear",
]
