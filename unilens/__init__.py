"""unilens: one standardized, verified view of any HuggingFace causal LM for interpretability, on nnsight."""

from .discovery import Architecture, ArchitectureError, ModuleAccessor, get_rename_dict
from .loading import default_model_path
from .model import StandardizedTransformer, load_default

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureError",
    "ModuleAccessor",
    "StandardizedTransformer",
    "default_model_path",
    "get_rename_dict",
    "load_default",
]
