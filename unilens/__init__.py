"""unilens: one standardized, verified view of any HuggingFace causal LM for interpretability, on nnsight.

The package is layered (docs/architecture.md); each tier imports only from the tiers below it:

    ui           display, cli
    conformance  kernels, diff, faults, support
    scale        store, sae
    analysis     lens, patching (+ sweep), attribution, steering, generation, prompts
    model        transformer, validation, remote
    compat       tl, nnterp, nnsight_utils
    hooks        attention, points, reads
    arch         structure, discovery, loading, offload, weights
    core         names, protocol, tensors, config, accessors, memo, distributed

``unilens.testing`` (the tiny model zoo) stands beside them; only tests, docs, the support report and the CLI use it.
"""

import importlib
import sys

from .analysis import (
    TargetPrompt,
    activation_patching,
    attribution_patching,
    logit_lens,
    patchscope_lens,
)
from .analysis.prompts import Prompt, run_prompts
from .arch.discovery import Architecture, ArchitectureError
from .arch.loading import default_model_path

# nnterp's top-level names, with nnterp's signatures (RenameConfig first; a RenameConfig / rename= steer discovery)
from .compat.nnsight_utils import ModuleAccessor
from .compat.nnterp import get_rename_dict
from .compat.factored_matrix import FactoredMatrix
from .compat.tl_model import HookedTransformer
from .model import StandardizedTransformer, load_default
from .scale.store import ActivationStore, cache_activations

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "Architecture",
    "ArchitectureError",
    "FactoredMatrix",
    "HookedTransformer",
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

# Module paths that name a module of an earlier, flat layout or of nnterp's API (``import unilens as nnterp``:
# nnterp.rename_utils, nnterp.interventions, ...): each is the module it moved to, the same object, so
# ``import unilens.tl``, ``from unilens.cache import ActivationStore`` and ``unilens.interventions.logit_lens`` work.
MODULE_ALIASES: dict[str, str] = {
    # nnterp 1.3's module paths
    "standardized_transformer": "model.transformer",
    "rename_utils": "compat.nnterp",
    "nnsight_utils": "compat.nnsight_utils",
    "interventions": "analysis",
    "prompt_utils": "analysis.prompts",
    # short public paths and the flat layout's modules
    "tl": "compat.tl",
    "generation": "analysis.generation",
    "display": "ui.display",
    "cli": "ui.cli",
    "cache": "scale.store",
    "sae": "scale.sae",
    "distributed": "core.distributed",
    "remote": "model.remote",
    "validation": "model.validation",
    "discovery": "arch.discovery",
    "loading": "arch.loading",
    "offload": "arch.offload",
    "weights": "arch.weights",
    "attention": "hooks.attention",
    "hook_points": "hooks.points",
    "order": "hooks.reads",
    "patching": "analysis.sweep",
    "conformance_faults": "conformance.faults",
    "support": "conformance.support",
}
for _old, _new in MODULE_ALIASES.items():
    _module = importlib.import_module(f"{__name__}.{_new}")
    sys.modules[f"{__name__}.{_old}"] = _module
    setattr(sys.modules[__name__], _old, _module)
