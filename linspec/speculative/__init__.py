"""Speculative generation — pure policy: drafters, draft trees, exact acceptance and the round loop.

Everything that runs a model (prefill, tree verification, commit) is ``linspec.models.runner.ModelRunner``.
"""

from linspec.speculative.drafters import (
    Draft,
    Drafter,
    DraftRequest,
    EarlyExitDrafter,
    FallbackDrafter,
    HeadDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    TreeGrowingDrafter,
)
from linspec.speculative.generate import SpeculativeOutput, SpeculativeStats, speculative_generate
from linspec.speculative.sampling import SamplingConfig
from linspec.speculative.tree import DraftTree, merge_chains

__all__ = [
    "Draft",
    "DraftRequest",
    "DraftTree",
    "Drafter",
    "EarlyExitDrafter",
    "FallbackDrafter",
    "HeadDrafter",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SamplingConfig",
    "SpeculativeOutput",
    "SpeculativeStats",
    "TreeGrowingDrafter",
    "merge_chains",
    "speculative_generate",
]
