"""Analysis on a standardized model: lenses, activation / attribution patching (entry points + the batched sweep
engine), direct logit attribution, steering, generation with interventions, and target-token tracking over prompts.

``unilens.interventions`` (nnterp's module path) is this package.
"""

from .attribution import direct_logit_attribution
from .lens import (
    TargetPrompt,
    TargetPromptBatch,
    it_repeat_prompt,
    logit_lens,
    patch_object_attn_lens,
    patchscope_generate,
    patchscope_lens,
    repeat_prompt,
)
from .patching import activation_patching, attribution_patching
from .steering import mean_difference_vector, steer_all

__all__ = [
    "logit_lens",
    "TargetPrompt",
    "TargetPromptBatch",
    "repeat_prompt",
    "patchscope_lens",
    "patchscope_generate",
    "patch_object_attn_lens",
    "it_repeat_prompt",
    "activation_patching",
    "attribution_patching",
    "direct_logit_attribution",
    "steer_all",
    "mean_difference_vector",
]
