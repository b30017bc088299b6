"""Every drafter kind in one table: a spec per kind that names the settings it takes, validates them once and
builds its drafter for a target.

``linspec generate``, ``linspec chat`` and ``linspec bench speculative`` ask for drafters only through here: the
command line's drafter flags are the settings below (``--tree-width`` is ``tree_width``), a flag the chosen kind
does not take is refused, and a spec's settings are checked when it is made — before any model loads — so a
mistake costs nothing. What needs the target (the exit layer against its depth, a draft model's vocabulary, a
trained drafter's fingerprint) is checked when the spec builds its drafter for that target.

Kinds: ``none`` (plain decoding), ``lookup``, ``early-exit``, ``model`` and the trained kinds ``medusa``,
``eagle`` and ``redrafter`` (their modules: ``linspec.drafting.store``); ``FallbackSpec`` combines two specs
(prompt lookup before a trained drafter: ``--lookup-first``).

Importing this module loads neither torch nor a drafter: ``--help`` lists the flags from this table, so what
builds drafters is imported when a spec builds one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from linspec.errors import LinspecError
from linspec.utils.validation import check_count

if TYPE_CHECKING:
    from linspec.speculative.drafters import (
        Drafter,
        EarlyExitDrafter,
        FallbackDrafter,
        ModelDrafter,
        PromptLookupDrafter,
    )

# Trained from the target with linspec train, loaded from a directory; linspec.drafting.store maps each to its module.
TRAINED_KINDS: tuple[str, ...] = ("medusa", "eagle", "redrafter")
KINDS: tuple[str, ...] = ("none", "lookup", "early-exit", "model", *TRAINED_KINDS)
MAX_DRAFT = 256  # draft depth, tree width and n-gram length: far beyond any useful tree, small enough to allocate
MAX_LAYERS = 1 << 12  # an exit layer; the target's own depth is checked when the drafter is built


def needs_trained_drafter(kind: str) -> bool:
    """Whether ``kind`` drafts with a module trained for the target (``--drafter DIR``)."""
    return kind in TRAINED_KINDS


@dataclass(frozen=True)
class Setting:
    """A drafter setting as the command line shows it: ``--NAME`` with dashes, its value type and help."""

    name: str
    type: type
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_DEPTH_HELP = "draft depth per round (default: lookup 10, early-exit and model 4, trained drafters their trained depth)"
_CONFIDENCE_HELP = "greedy: propose only drafts whose cumulative probability reaches this (default 0)"
_LOOKUP_FIRST_HELP = "draft by prompt lookup where the context has a match, by the trained drafter elsewhere"
SETTINGS: dict[str, Setting] = {
    setting.name: setting
    for setting in (
        Setting("drafter", str, "trained drafter directory (linspec train)", "DIR"),
        Setting("draft_model", str, "the draft model, sharing the tokenizer", "SRC"),
        Setting("exit_layer", int, "layers the early-exit drafter uses", "N"),
        Setting("num_draft_tokens", int, _DEPTH_HELP, "N"),
        Setting("tree_width", int, "1 = chain (default); >1 = a tree", "W"),
        Setting("max_ngram", int, "longest n-gram prompt lookup matches (default 3)", "N"),
        Setting("min_confidence", float, _CONFIDENCE_HELP, "C"),
        Setting("lookup_first", bool, _LOOKUP_FIRST_HELP),
    )
}


def _flag(name: str) -> str:
    return SETTINGS[name].flag


def _count(value: int, name: str, high: int = MAX_DRAFT) -> int:
    return check_count(value, _flag(name), 1, high)


class DrafterSpec:
    """A validated request for one kind of drafter; ``build`` makes the drafter for a target.

    Subclasses are frozen dataclasses whose fields are the kind's settings (names of ``SETTINGS``); their
    ``__post_init__`` is the one place those settings are checked.
    """

    kind: ClassVar[str]

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """The settings this kind takes."""
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def build(self, target, tokenizer=None) -> Drafter | None:
        """The drafter for ``target`` (its ``tokenizer`` checks a trained drafter's vocabulary); None: plain."""
        raise NotImplementedError


@dataclass(frozen=True)
class PlainSpec(DrafterSpec):
    """No drafter: plain decoding through the same loop."""

    kind: ClassVar[str] = "none"

    def build(self, target, tokenizer=None) -> None:
        return None


@dataclass(frozen=True)
class LookupSpec(DrafterSpec):
    """Prompt lookup: ``tree_width`` distinct continuations of the context's n-gram matches (no model runs)."""

    kind: ClassVar[str] = "lookup"
    num_draft_tokens: int = 10  # cheap drafts: a long one costs nothing when it is wrong
    tree_width: int = 1
    max_ngram: int = 3

    def __post_init__(self) -> None:
        for name in ("num_draft_tokens", "tree_width", "max_ngram"):
            _count(getattr(self, name), name)

    def build(self, target, tokenizer=None) -> PromptLookupDrafter:
        from linspec.speculative.drafters import PromptLookupDrafter

        return PromptLookupDrafter(num_tokens=self.num_draft_tokens, max_ngram=self.max_ngram,
                                   num_drafts=self.tree_width)  # fmt: skip


@dataclass(frozen=True)
class EarlyExitSpec(DrafterSpec):
    """The target's first ``exit_layer`` layers, its final norm and head."""

    kind: ClassVar[str] = "early-exit"
    exit_layer: int | None = None
    num_draft_tokens: int = 4  # each level costs a share of a target forward
    tree_width: int = 1

    def __post_init__(self) -> None:
        if self.exit_layer is None:
            raise LinspecError("--draft early-exit needs --exit-layer N")
        _count(self.exit_layer, "exit_layer", MAX_LAYERS)
        _count(self.num_draft_tokens, "num_draft_tokens")
        _count(self.tree_width, "tree_width")

    def build(self, target, tokenizer=None) -> EarlyExitDrafter:
        from linspec.speculative.drafters import EarlyExitDrafter

        drafter = EarlyExitDrafter(self.exit_layer, num_tokens=self.num_draft_tokens, tree_width=self.tree_width)
        drafter.check_target(target.config.get_text_config(decoder=True).num_hidden_layers, _flag("exit_layer"))
        return drafter


@dataclass(frozen=True)
class ModelSpec(DrafterSpec):
    """A separate causal LM sharing the target's tokenizer: a source to load (``--draft-model SRC``, placed like
    the target) or a model already loaded."""

    kind: ClassVar[str] = "model"
    draft_model: Any = None
    num_draft_tokens: int = 4  # each level is a forward of the draft model
    tree_width: int = 1

    def __post_init__(self) -> None:
        if self.draft_model is None or (isinstance(self.draft_model, str) and not self.draft_model.strip()):
            raise LinspecError("--draft model needs --draft-model SRC (a model sharing the tokenizer)")
        _count(self.num_draft_tokens, "num_draft_tokens")
        _count(self.tree_width, "tree_width")

    def build(self, target, tokenizer=None) -> ModelDrafter:
        from linspec.sources.loading import load_source
        from linspec.speculative.drafters import ModelDrafter

        model = self.draft_model
        if isinstance(model, str | os.PathLike):
            head = target.get_output_embeddings().weight
            model = load_source(str(model), dtype=head.dtype, device=head.device)[0]
        sizes = (target.get_input_embeddings().num_embeddings, model.get_input_embeddings().num_embeddings)
        if sizes[0] != sizes[1]:
            raise LinspecError(
                f"--draft-model {self.draft_model if isinstance(self.draft_model, str) else 'given'} has "
                f"{sizes[1]} tokens, the model {sizes[0]}: not the same tokenizer"
            )
        return ModelDrafter(model, num_tokens=self.num_draft_tokens, tree_width=self.tree_width)


@dataclass(frozen=True)
class TrainedSpec(DrafterSpec):
    """A drafter trained for the target (``linspec train``): a directory, loaded and checked against the target,
    or a module already loaded. ``num_draft_tokens`` defaults to its trained depth; ``lookup_first`` puts prompt
    lookup (``max_ngram``) before it."""

    kind: ClassVar[str]
    drafter: Any = None
    num_draft_tokens: int | None = None
    tree_width: int = 1
    min_confidence: float = 0.0
    lookup_first: bool = False
    max_ngram: int | None = None

    def __post_init__(self) -> None:
        if self.drafter is None or (isinstance(self.drafter, str) and not self.drafter.strip()):
            raise LinspecError(f"--draft {self.kind} needs --drafter DIR (a drafter trained with linspec train)")
        if self.num_draft_tokens is not None:
            _count(self.num_draft_tokens, "num_draft_tokens")
        _count(self.tree_width, "tree_width")
        confidence = self.min_confidence
        if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence < 1:
            raise LinspecError(f"--min-confidence must be in [0, 1), got {confidence}")
        if self.max_ngram is not None:
            if not self.lookup_first:
                raise LinspecError("--max-ngram applies to a trained drafter only with --lookup-first")
            _count(self.max_ngram, "max_ngram")

    def build(self, target, tokenizer=None) -> Drafter:
        from linspec.drafting.base import TrainedDrafter
        from linspec.drafting.store import load_drafter

        module = self.drafter
        if not isinstance(module, TrainedDrafter):
            module = load_drafter(module, target, tokenizer)
        if module.kind != self.kind:
            raise LinspecError(f"the drafter given is a {module.kind} drafter, not {self.kind}")
        if self.lookup_first:
            lookup = LookupSpec(max_ngram=3 if self.max_ngram is None else self.max_ngram)
            alone = replace(self, drafter=module, lookup_first=False, max_ngram=None)
            return FallbackSpec(lookup, alone).build(target, tokenizer)
        return module.drafter(self.num_draft_tokens, self.tree_width, self.min_confidence)


@dataclass(frozen=True)
class FallbackSpec(DrafterSpec):
    """``first`` where it proposes something, ``then`` for the rows it leaves empty (``FallbackDrafter``)."""

    kind: ClassVar[str] = "fallback"
    first: DrafterSpec
    then: DrafterSpec

    def build(self, target, tokenizer=None) -> FallbackDrafter:
        from linspec.speculative.drafters import FallbackDrafter

        first, then = self.first.build(target, tokenizer), self.then.build(target, tokenizer)
        if first is None or then is None:
            raise LinspecError("a fallback drafter needs a drafter on both sides")
        return FallbackDrafter(first, then)


def _trained_spec(kind: str) -> type[TrainedSpec]:
    return type(f"{kind.capitalize()}Spec", (TrainedSpec,), {"kind": kind, "__doc__": TrainedSpec.__doc__})


SPECS: dict[str, type[DrafterSpec]] = {
    spec.kind: spec
    for spec in (PlainSpec, LookupSpec, EarlyExitSpec, ModelSpec, *(_trained_spec(kind) for kind in TRAINED_KINDS))
}
assert tuple(SPECS) == KINDS


def kinds_taking(name: str) -> tuple[str, ...]:
    """The kinds a setting applies to, in the table's order."""
    return tuple(kind for kind, spec in SPECS.items() if name in spec.settings())


def drafter_spec(kind: str, **settings) -> DrafterSpec:
    """The spec of ``kind`` with ``settings`` (names of ``SETTINGS``; left out: the kind's default), checked:
    an unknown kind, a setting the kind does not take, or a value out of range is one ``LinspecError``."""
    spec = SPECS.get(kind)
    if spec is None:
        raise LinspecError(f"--draft must be one of {', '.join(KINDS)}; got {kind!r:.40}")
    for name in settings:
        if name not in SETTINGS:
            raise LinspecError(f"unknown drafter setting {name!r}; known: {', '.join(SETTINGS)}")
        if name not in spec.settings():
            raise LinspecError(
                f"{_flag(name)} only applies to --draft {' or '.join(kinds_taking(name))} (got --draft {kind})"
            )
    return spec(**settings)
