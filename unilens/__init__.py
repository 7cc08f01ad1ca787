"""unilens: one standardized, verified view of any HuggingFace causal LM for interpretability, on nnsight."""

from .discovery import Architecture, ArchitectureError
from .loading import default_model_path
from .model import StandardizedTransformer, load_default
from .interventions import logit_lens, patchscope_lens, activation_patching, attribution_patching, TargetPrompt
from .prompt_utils import Prompt, run_prompts
from .cache import ActivationStore, cache_activations
# nnterp's top-level names, with nnterp's signatures (RenameConfig first; a RenameConfig / rename= steer discovery)
from .nnsight_utils import ModuleAccessor
from .rename_utils import get_rename_dict

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "Architecture",
    "ArchitectureError",
    "ModuleAccessor",
    "Prompt",
    "StandardizedTransformer",
    "TargetPrompt",
    "activation_patching",
    "attribution_patching",
    "cache_activations",
    "logit_lens",
    "patchscope_lens",
    "run_prompts",
    "default_model_path",
    "get_rename_dict",
    "load_default",
]
