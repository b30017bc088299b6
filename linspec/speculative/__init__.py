"""Speculative generation: drafters, tree verification, exact acceptance and state commit (DESIGN §6)."""

from linspec.speculative.drafters import (
    Drafter,
    DraftRequest,
    EarlyExitDrafter,
    HeadDrafter,
    ModelDrafter,
    PromptLookupDrafter,
    TreeGrowingDrafter,
)
from linspec.speculative.generate import SpeculativeOutput, SpeculativeStats, speculative_generate
from linspec.speculative.sampling import SamplingConfig
from linspec.speculative.session import ModelSession
from linspec.speculative.tree import DraftTree, merge_chains

__all__ = [
    "DraftRequest",
    "DraftTree",
    "Drafter",
    "EarlyExitDrafter",
    "HeadDrafter",
    "ModelDrafter",
    "ModelSession",
    "PromptLookupDrafter",
    "SamplingConfig",
    "SpeculativeOutput",
    "SpeculativeStats",
    "TreeGrowingDrafter",
    "merge_chains",
    "speculative_generate",
]
