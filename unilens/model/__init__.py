"""The standardized model: ``StandardizedTransformer`` (``transformer``), its load-time check (``validation``) and
remote mode (``remote``, with the offline ``Loopback`` server)."""

from ..hooks.reads import ReadOrderError
from .transformer import StandardizedTransformer, load_default

__all__ = ["ReadOrderError", "StandardizedTransformer", "load_default"]
