"""nnterp's module path ``standardized_transformer``: ``from unilens.standardized_transformer import StandardizedTransformer``.

The class itself lives in ``unilens.model`` (one definition; this module re-exports it so nnterp imports run).

Example:
    >>> from unilens.standardized_transformer import StandardizedTransformer
    >>> from unilens.model import StandardizedTransformer as Same
    >>> StandardizedTransformer is Same
    True
"""

from .model import StandardizedTransformer

__all__ = ["StandardizedTransformer"]
