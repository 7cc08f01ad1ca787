"""Conformance: attention kernels against a float64 reference (``kernels``), where two implementations of a model
diverge (``diff``), planted faults to test both with (``faults``), and the support report over the model zoo
(``support``)."""

from .diff import (
    DivergenceReport,
    DivergenceRow,
    diff_model_implementations,
    diff_models,
)
from .kernels import (
    AttentionCase,
    AttentionImplementation,
    CaseResult,
    ConformanceReport,
    ImplementationUnavailable,
    check_attention,
    default_cases,
    get_implementation,
    reference_as_attention_fn,
    reference_attention,
    run_attn_check,
    visibility_mask,
)

__all__ = [
    "AttentionCase",
    "AttentionImplementation",
    "CaseResult",
    "ConformanceReport",
    "DivergenceReport",
    "DivergenceRow",
    "ImplementationUnavailable",
    "check_attention",
    "default_cases",
    "diff_model_implementations",
    "diff_models",
    "get_implementation",
    "reference_as_attention_fn",
    "reference_attention",
    "run_attn_check",
    "visibility_mask",
]
