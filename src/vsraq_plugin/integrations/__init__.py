"""Hooks into transformers and optimum, installed by ``import vsraq_plugin`` (idempotent, no gptqmodel import).

``integrations.transformers``: ``GPTQConfig(quantizer="vsraq")``, the ``"vsraq"`` quantization method, GPTQ
MoE checkpoints through ``from_pretrained``. ``integrations.optimum``: ``GPTQQuantizer(quantizer="vsraq")``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vsraq_plugin")

# Which hooks are in place, and why a missing one is missing (shown by the entry points that need it).
STATUS: dict[str, str] = {}


def install() -> dict[str, str]:
    """Install every hook whose library imports; returns ``{library: "installed" | reason}``."""
    for name in ("transformers", "optimum"):
        try:
            module = __import__(f"{__name__}.{name}", fromlist=["install"])
            module.install()
            STATUS[name] = "installed"
        except ImportError as exc:  # the library (or a part of it) is absent: that entry point says so
            STATUS[name] = f"not installed: {exc}"
            logger.debug("vsraq: %s hook not installed (%s)", name, exc)
    return dict(STATUS)
