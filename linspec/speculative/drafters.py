"""Drafters: one interface for everything that proposes candidate tokens for the target to verify.

A drafter proposes a ``DraftTree`` (a chain is a tree) after each row's pending token, with the distribution
each node was drawn from, and rolls its own state forward only by what the target accepted. Implemented:

* ``ModelDrafter`` — a separate causal LM sharing the tokenizer (a small model, or a converted linear model
  drafting for its own softmax parent); its own ``ModelRunner``, advanced by accepted tokens only.
* ``EarlyExitDrafter`` — the target's first ``exit_layer`` layers + final norm + head, evaluated on the target's
  *own* committed state (no second cache); the verification continues from the drafted hidden states.
* ``PromptLookupDrafter`` — continuations of the context's most recent n-gram matches, merged into a tree.
* ``HeadDrafter`` — heads on the target's last hidden state (Medusa-style): the plug for trained heads.

Tree-shaped drafting from a model (``TreeGrowingDrafter``) grows the tree level by level; each level is one
tree-mode forward over the whole tree so far (verification mode: nothing committed changes), so a drafter needs
no rollback — it commits what the target accepted from its last forward.

A round's working state (the tree pass a drafter opened, which rows it drafted for) is not kept on the drafter:
``propose`` returns it beside the tree (a ``Draft``) and the caller hands it back to ``advance``. What a drafter
keeps on itself lives across rounds and is bound in ``start`` (its own runner, a row's history).

Which drafter a command line or a benchmark asks for, with which settings, is ``linspec.drafting.registry``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from linspec.errors import LinspecError
from linspec.models.runner import ModelRunner, TreePass, model_vocab_size
from linspec.speculative.sampling import SamplingConfig, normalize, sample
from linspec.speculative.tree import DraftTree, merge_chains
from linspec.utils.validation import check_count


@dataclass
class DraftRequest:
    """What a drafter may look at: the committed tokens and the target's view of the last one."""

    sequences: torch.Tensor  # (B, L) committed tokens per row, left-aligned; the last real one is the root
    lengths: torch.Tensor  # (B,) real tokens per row
    max_depth: int  # deeper drafts would be cut by max_new_tokens anyway
    sampling: SamplingConfig
    generator: torch.Generator | None
    # Final hidden state (after the last norm) of the token before the root, the one that predicted the root;
    # None before the first verification when the prompt had a single token.
    target_hidden: torch.Tensor | None = None  # (B, H)


class Draft(NamedTuple):
    """What ``Drafter.propose`` returns: the tree, and the drafter's own record of the round, which the caller hands
    back to ``advance`` unread (None when the drafter needs none)."""

    tree: DraftTree
    state: Any = None


class Drafter:
    """The interface. ``max_nodes`` bounds the size of any proposed tree (checked against the configured limit).

    A round is ``propose`` then ``advance``; whatever ``advance`` needs from ``propose`` travels in the returned
    ``Draft.state``, so a drafter's attributes change only in ``start``, ``advance`` and ``select_rows`` — and only
    for what must outlive the round.
    """

    max_nodes: int = 0

    def start(self, target: ModelRunner, sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        """Bind to a generation: ``sequences [B, L]`` left-aligned prompts of ``lengths`` tokens."""

    def propose(self, request: DraftRequest) -> Draft:
        raise NotImplementedError

    def advance(self, state: Any, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        """The target accepted draft nodes ``accepted [B, D]`` (path order, real where ``accepted_mask``) of the
        round whose ``Draft.state`` was ``state``."""

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` of the batch."""


class TreeGrowingDrafter(Drafter):
    """Grows a chain (``tree_width == 1``) or a tree of ``num_tokens`` levels from per-node next-token logits.

    Greedy: a chain of argmaxes, or a dynamic tree keeping the ``tree_width`` best nodes per level by cumulative
    draft probability (each expanded into its top ``tree_width`` children) — deterministic, so q is a point mass.
    Sampling: a chain drawn from q, or ``tree_width`` root children drawn from q *without replacement* (each
    node records the renormalised q it was drawn from), each continued as a sampled chain.

    ``min_confidence`` (greedy): a node whose cumulative draft probability falls below it is not proposed, and
    growth stops at a level with no such node — an unconfident drafter proposes nothing and the round is a plain
    step, which on CPU costs half a verification. The choice depends only on the drafter, so output stays exact.
    """

    def __init__(self, num_tokens: int = 4, tree_width: int = 1, min_confidence: float = 0.0) -> None:
        check_count(num_tokens, "num_tokens")
        check_count(tree_width, "tree_width")
        if (
            isinstance(min_confidence, bool)
            or not isinstance(min_confidence, int | float)
            or not 0 <= min_confidence < 1
        ):
            raise LinspecError(f"min_confidence must be in [0, 1), got {min_confidence!r}")
        self.num_tokens = num_tokens
        self.tree_width = tree_width
        self.min_log_confidence = math.log(min_confidence) if min_confidence > 0 else -math.inf
        self.max_nodes = num_tokens * tree_width

    def _begin_round(self, request: DraftRequest) -> Any:
        """The round's working state, passed to every level and returned as ``Draft.state`` (None: none)."""
        return None

    def _frontier_logits(
        self, request: DraftRequest, tree: DraftTree, frontier: torch.Tensor, level: int, state: Any
    ) -> torch.Tensor:
        """Next-token logits ``[B, F, V]`` after each frontier node (``frontier [B, F]``, -1 = the root) of the
        tree so far, whose deepest nodes are at depth ``level``."""
        raise NotImplementedError

    def propose(self, request: DraftRequest) -> Draft:
        state = self._begin_round(request)
        batch = request.lengths.shape[0]
        device = request.sequences.device
        sampling, width = request.sampling, self.tree_width
        tree = DraftTree.empty(batch, device)
        qs: list[torch.Tensor] = []
        frontier = torch.full((batch, 1), -1, dtype=torch.long, device=device)  # the root
        frontier_ok = torch.ones(batch, 1, dtype=torch.bool, device=device)
        frontier_score = torch.zeros(batch, 1, device=device)  # cumulative log q (greedy trees)
        for level in range(min(self.num_tokens, request.max_depth)):
            logits = self._frontier_logits(request, tree, frontier, level, state)  # (B, F, V)
            if sampling.greedy:  # keep the `width` best of each frontier node's top-`width` children
                top = logits.float().log_softmax(-1).topk(width, dim=-1)  # (B, F, W)
                candidate = (frontier_score[:, :, None] + top.values).masked_fill(~frontier_ok[:, :, None], -1e30)
                best = candidate.flatten(1).topk(width, dim=-1)  # (B, W) over F*W candidates
                tokens = top.indices.flatten(1).gather(1, best.indices)
                parents = frontier.gather(1, best.indices // width)
                ok = frontier_ok.gather(1, best.indices // width) & (best.values > max(-1e29, self.min_log_confidence))
                frontier_score = best.values
                if not bool(ok.any()):  # nothing confident enough at this level: stop growing
                    break
            elif level == 0 and width > 1:  # root children drawn from q without replacement
                q_root = sampling.probs(logits[:, 0])  # (B, V)
                drawn, q_used = [], []
                for _ in range(width):
                    q_used.append(normalize(q_root))
                    drawn.append(sample(q_used[-1], request.generator))
                    q_root = q_root.scatter(1, drawn[-1][:, None], 0.0)
                tokens, q = torch.stack(drawn, 1), torch.stack(q_used, 1)  # (B, W), (B, W, V)
                parents = frontier.expand(batch, width)
                ok = frontier_ok.expand(batch, width) & (q.gather(2, tokens[:, :, None])[:, :, 0] > 0)
                qs.append(q)
            else:  # one child per frontier node drawn from its q
                q = sampling.probs(logits)  # (B, F, V)
                tokens = sample(q.flatten(0, 1), request.generator).view(batch, -1)
                parents = frontier
                ok = frontier_ok & (q.gather(2, tokens[:, :, None])[:, :, 0] > 0)
                qs.append(q)
            first = tree.num_nodes
            tree = DraftTree(
                tokens=torch.cat([tree.tokens, tokens], 1),
                parents=torch.cat([tree.parents, parents], 1),
                valid=torch.cat([tree.valid, ok], 1),
            )
            frontier = first + torch.arange(tokens.shape[1], device=device).expand(batch, -1)
            frontier_ok = ok
        if qs:
            tree.q = torch.cat(qs, 1)
        return Draft(self._finish(request, tree, state), state)

    def _finish(self, request: DraftRequest, tree: DraftTree, state: Any) -> DraftTree:
        return tree


@dataclass
class ModelRound:
    """A ``ModelDrafter`` round: its latest tree pass, which of its slots are committed tokens it had not seen
    (``unseen [B, U]``) and the depth that pass evaluated draft nodes to (-1: no pass ran)."""

    tree_pass: TreePass | None = None
    unseen: torch.Tensor | None = None
    forwarded_depth: int = -1


class ModelDrafter(TreeGrowingDrafter):
    """A separate causal LM that shares the target's tokenizer (same vocabulary), with its own state.

    The drafter's runner holds the committed tokens it has consumed; each round it evaluates, in tree mode,
    the committed tokens it has not seen yet (1 or 2) followed by the tree so far, and afterwards commits the
    accepted ones — its state only ever moves forward by committed tokens. The runner is the one thing kept on
    the drafter across rounds: it *is* the draft model's cache of the committed text.
    """

    def __init__(self, model, num_tokens: int = 4, tree_width: int = 1) -> None:
        super().__init__(num_tokens, tree_width)
        self.model = model
        self.runner: ModelRunner | None = None

    def start(self, target: ModelRunner, sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        mine, theirs = model_vocab_size(self.model), target.vocab_size
        if mine != theirs:
            raise LinspecError(
                f"the drafter's vocabulary ({mine} tokens) differs from the target's ({theirs}); a draft model "
                "must share the target's tokenizer"
            )
        self.runner = ModelRunner(self.model, lengths.shape[0])
        prefix = int(lengths.max()) - 1
        if prefix > 0:  # everything but each row's last token, right-aligned (left padding)
            tokens, mask = _right_aligned(sequences, lengths - 1, prefix)
            self.runner.extend(tokens, mask)

    def _layout(self, request: DraftRequest, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[committed tokens not yet seen (left-padded to U slots) ; tree nodes]``: tokens, parents, and which
        of the U slots hold real unseen tokens.

        Padding slots are lone roots nobody descends from; the tree's root is slot ``U - 1``.
        """
        unseen = request.lengths - self.runner.length  # (B,) >= 1
        width = int(unseen.max())
        tokens, _ = _right_aligned(request.sequences, request.lengths, width)
        slot = torch.arange(width, device=tokens.device)
        mask = slot >= width - unseen[:, None]  # (B, U) real unseen tokens
        chain_parent = torch.where(mask & (slot - 1 >= width - unseen[:, None]), slot - 1, -1)
        node_parents = torch.where(tree.parents >= 0, tree.parents + width, width - 1)
        return torch.cat([tokens, tree.tokens], 1), torch.cat([chain_parent, node_parents], 1), mask

    def _begin_round(self, request: DraftRequest) -> ModelRound:
        return ModelRound()

    def _frontier_logits(self, request, tree, frontier, level, state: ModelRound) -> torch.Tensor:
        tokens, parents, state.unseen = self._layout(request, tree)
        state.tree_pass = self.runner.begin_tree(tokens, parents)
        hidden = state.tree_pass.run_layers(state.tree_pass.hidden)
        width = state.unseen.shape[1]
        state.forwarded_depth = level  # this forward evaluated every draft node down to depth `level`
        at = torch.where(frontier >= 0, frontier + width, width - 1)
        picked = hidden.gather(1, at[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.runner.logits(self.runner.final_hidden(picked))

    def advance(self, state: ModelRound, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        """Commit the unseen committed tokens and the accepted nodes the round's last forward evaluated; the rest
        (the last level's nodes, the target's correction or bonus token) is evaluated next round."""
        if state.forwarded_depth < 0:  # nothing was evaluated this round
            return
        batch, width = state.unseen.shape
        slots = torch.arange(width, device=accepted.device).expand(batch, width)
        depth = state.forwarded_depth  # path entry j sits at depth j + 1
        keep = torch.cat([slots, accepted[:, :depth] + width], 1)
        keep_mask = torch.cat([state.unseen, accepted_mask[:, :depth]], 1)
        state.tree_pass.commit(keep, keep_mask)

    def select_rows(self, index: torch.Tensor) -> None:
        self.runner.select_rows(index)


def _right_aligned(sequences: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``width`` tokens before ``lengths`` of each left-aligned row, left-padded: ``(tokens, mask)``."""
    start = lengths[:, None] - width
    index = start + torch.arange(width, device=sequences.device)
    mask = index >= 0
    tokens = sequences.gather(1, index.clamp(min=0))
    return torch.where(mask, tokens, 0), mask


class PromptLookupDrafter(Drafter):
    """Drafts by prompt lookup: find the context's most recent earlier occurrences of its last n tokens
    (n from ``max_ngram`` down to ``min_ngram``) and propose what followed them. Up to ``num_drafts`` distinct
    continuations of up to ``num_tokens`` are merged into one tree (shared prefixes once). Deterministic: point
    masses. ``min_ngram`` defaults to 2: on CPU, verifying two tokens costs ~1.6 single-token steps (the matrix
    products leave the matrix-vector path), and a one-token match predicts too poorly to pay for that — in
    general. Where a row is copying (at least half of its drafts so far had their first token accepted), matches
    down to ``reliable_min_ngram`` (default 1) are used too: right after the model departs from the source for
    a token or two, a one-token match is what finds the way back, where a plain step would wait for a 2-gram.
    Which n-grams are used depends only on the row's past, so acceptance stays exact. That past — each row's
    history, its n-gram index and its record of accepted drafts — is what the drafter keeps across rounds; a
    round's own state is which rows it drafted for.
    """

    def __init__(
        self,
        num_tokens: int = 10,
        max_ngram: int = 3,
        min_ngram: int = 2,
        num_drafts: int = 1,
        reliable_min_ngram: int | None = 1,
    ) -> None:
        reliable_min_ngram = min_ngram if reliable_min_ngram is None else reliable_min_ngram
        for name, value in (("num_tokens", num_tokens), ("max_ngram", max_ngram), ("min_ngram", min_ngram),
                            ("num_drafts", num_drafts), ("reliable_min_ngram", reliable_min_ngram)):  # fmt: skip
            check_count(value, name)
        if min_ngram > max_ngram:
            raise LinspecError(f"min_ngram ({min_ngram}) must not exceed max_ngram ({max_ngram})")
        self.num_tokens, self.max_ngram, self.min_ngram, self.num_drafts = num_tokens, max_ngram, min_ngram, num_drafts
        self.reliable_min_ngram = min(reliable_min_ngram, min_ngram)
        self.max_nodes = num_tokens * num_drafts

    def start(self, target: ModelRunner, sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        self.history: list[list[int]] = [[] for _ in range(lengths.shape[0])]
        self.index: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(lengths.shape[0])]
        # Per row: rounds it drafted in, and those whose first drafted token was accepted.
        self.drafted_rounds = [0] * lengths.shape[0]
        self.first_accepted = [0] * lengths.shape[0]

    def _shortest_ngram(self, row: int) -> int:
        reliable = 2 * self.first_accepted[row] >= self.drafted_rounds[row] > 0
        return self.reliable_min_ngram if reliable else self.min_ngram

    def _sync(self, request: DraftRequest) -> None:
        """Append each row's newly committed tokens to its history and index their n-grams."""
        known = torch.tensor([len(h) for h in self.history], device=request.lengths.device)
        new_count = request.lengths - known
        width = int(new_count.max())
        if width <= 0:
            return
        index = known[:, None] + torch.arange(width, device=known.device)
        new = request.sequences.gather(1, index.clamp(max=request.sequences.shape[1] - 1)).tolist()
        for row, (tokens, count) in enumerate(zip(new, new_count.tolist(), strict=True)):
            history, table = self.history[row], self.index[row]
            for token in tokens[:count]:
                history.append(token)
                end = len(history)
                for n in range(self.reliable_min_ngram, min(self.max_ngram, end) + 1):
                    table.setdefault(tuple(history[end - n :]), []).append(end)

    def _row_chains(self, history: list[int], table: dict, depth: int, shortest: int) -> list[list[int]]:
        chains: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        end = len(history)
        for n in range(min(self.max_ngram, end), shortest - 1, -1):
            for after in reversed(table.get(tuple(history[end - n :]), ())):
                if after >= end:
                    continue  # the suffix itself: nothing follows it yet
                chain = tuple(history[after : after + depth])
                if chain not in seen:
                    seen.add(chain)
                    chains.append(list(chain))
                    if len(chains) == self.num_drafts:
                        return chains
        return chains

    def propose(self, request: DraftRequest) -> Draft:
        """The merged tree, and as the round's state which rows drafted (``list[bool]``)."""
        self._sync(request)
        depth = min(self.num_tokens, request.max_depth)
        chains = [
            self._row_chains(self.history[row], self.index[row], depth, self._shortest_ngram(row)) if depth > 0 else []
            for row in range(len(self.history))
        ]
        drafted = [bool(row_chains) for row_chains in chains]
        return Draft(merge_chains(chains, device=request.sequences.device), drafted)

    def advance(self, state: list[bool], accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        first = accepted_mask[:, 0].tolist() if accepted_mask.shape[1] else [False] * len(state)
        for row, (drafted, hit) in enumerate(zip(state, first, strict=True)):
            self.drafted_rounds[row] += drafted
            self.first_accepted[row] += drafted and hit

    def select_rows(self, index: torch.Tensor) -> None:
        keep = index.tolist()
        for name in ("history", "index", "drafted_rounds", "first_accepted"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])


class EarlyExitDrafter(TreeGrowingDrafter):
    """Self-drafting: the target's first ``exit_layer`` decoder layers, its final norm and its head.

    It runs on the target runner itself, in tree mode, so it reads the target's committed state and keeps none
    of its own (nothing to roll forward: the target's commit is its commit). After the last level it runs those
    layers once more over the whole tree and verification continues from those hidden states at ``exit_layer``:
    that pass *is* the verification's first layers, so it costs nothing extra — and saves nothing either, since
    each drafting level is itself a tree-mode forward (there is no cheaper incremental draft to reuse).
    """

    def __init__(self, exit_layer: int, num_tokens: int = 4, tree_width: int = 1) -> None:
        super().__init__(num_tokens, tree_width)
        self.exit_layer = check_count(exit_layer, "exit_layer")

    def check_target(self, num_layers: int, name: str = "exit_layer") -> None:
        """Refuse an exit layer that is not below the target's ``num_layers`` (``name``: how the user said it)."""
        if self.exit_layer >= num_layers:
            raise LinspecError(f"{name} {self.exit_layer} must be below the model's {num_layers} layers")

    def start(self, target: ModelRunner, sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        """Binds the target runner for the generation: the drafter drafts on it, keeping no state of its own."""
        self.check_target(target.num_layers)
        self.target = target

    def _run(self, request: DraftRequest, tree: DraftTree) -> tuple[TreePass, torch.Tensor]:
        """A tree pass of the target over ``[root; tree]`` and its hidden states after ``exit_layer`` layers."""
        root = request.sequences.gather(1, (request.lengths - 1)[:, None])[:, 0]
        tokens, parents, _ = tree.with_root(root)
        tree_pass = self.target.begin_tree(tokens, parents)
        return tree_pass, tree_pass.run_layers(tree_pass.hidden, 0, self.exit_layer)

    def _frontier_logits(self, request, tree, frontier, level, state) -> torch.Tensor:
        _, hidden = self._run(request, tree)  # (B, 1 + N, H), the root first
        picked = hidden.gather(1, (frontier + 1)[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.target.logits(self.target.final_hidden(picked))

    def _finish(self, request: DraftRequest, tree: DraftTree, state) -> DraftTree:
        if tree.num_nodes:
            tree_pass, hidden = self._run(request, tree)
            tree.target_pass, tree.target_hidden = tree_pass, (self.exit_layer, hidden)
        return tree


class HeadDrafter(TreeGrowingDrafter):
    """Drafts from heads on the target's last hidden state: ``heads(h [B, H]) -> logits [B, K, V]``, head ``k``
    predicting the token ``k + 1`` places after the root (Medusa-style: the hidden state that predicted the root).

    This is the plug for trained drafters that read the target's hidden state: Medusa heads directly; a
    ReDrafter-style RNN or prophet heads by overriding ``_frontier_logits`` to condition on the frontier path.
    """

    def __init__(
        self, heads: Callable[[torch.Tensor], torch.Tensor], num_tokens: int, tree_width: int = 1,
        min_confidence: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(num_tokens, tree_width, min_confidence)
        self.heads = heads

    def start(self, target: ModelRunner, sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        """Keeps the target's vocabulary size, to check the heads against it each round."""
        self.vocab_size = target.vocab_size

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> Draft:
        if request.target_hidden is None:
            return Draft(DraftTree.empty(request.lengths.shape[0], request.sequences.device))
        return super().propose(request)

    def _begin_round(self, request: DraftRequest) -> torch.Tensor:
        """Every head's logits ``[B, K, V]`` from this round's hidden state: the levels read them in turn."""
        head_logits = self.heads(request.target_hidden)
        if head_logits.shape[-1] != self.vocab_size:
            raise LinspecError(
                f"the heads' vocabulary ({head_logits.shape[-1]}) differs from the target's ({self.vocab_size})"
            )
        return head_logits

    def _frontier_logits(self, request, tree, frontier, level, state: torch.Tensor) -> torch.Tensor:
        level = min(level, state.shape[1] - 1)
        return state[:, level : level + 1].expand(-1, frontier.shape[1], -1)


class FallbackDrafter(Drafter):
    """``first`` where it proposes something, ``then`` for the rows it leaves empty — prompt lookup first, a
    trained drafter otherwise: copying stretches get lookup's long cheap drafts, the rest the trained drafter's.

    Per row the tree is one drafter's own, so acceptance (greedy or sampled) is exactly that drafter's; in a batch
    whose rows mix them, the trees are padded to one width and point-mass rows get one-hot distributions.
    ``then`` runs only in rounds where some row needs it, so it must not depend on seeing every round (trained
    drafters and heads start from the target's hidden state each round); each drafter hears back only about the
    rows it drafted for, and only in rounds it drafted in.
    """

    def __init__(self, first: Drafter, then: Drafter) -> None:
        self.first, self.then = first, then
        self.max_nodes = max(first.max_nodes, then.max_nodes)

    def start(self, target: ModelRunner, sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        self.first.start(target, sequences, lengths)
        self.then.start(target, sequences, lengths)

    def propose(self, request: DraftRequest) -> Draft:
        first, first_state = self.first.propose(request)
        by_first = first.valid.any(1) if first.num_nodes else torch.zeros_like(request.lengths, dtype=torch.bool)
        if bool(by_first.all()):
            return Draft(first, FallbackRound(by_first, first_state))
        then, then_state = self.then.propose(request)
        state = FallbackRound(by_first, first_state, then_drafted=True, then=then_state)
        if not bool(by_first.any()):
            return Draft(then, state)
        if then.target_pass is not None:  # its layers ran on its own trees, not on the merged one
            then.target_pass.discard()
        return Draft(_rows_from(by_first, first, then), state)

    def advance(self, state: FallbackRound, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        by_first = state.by_first[:, None]
        self.first.advance(state.first, accepted, accepted_mask & by_first)
        if state.then_drafted:
            self.then.advance(state.then, accepted, accepted_mask & ~by_first)

    def select_rows(self, index: torch.Tensor) -> None:
        self.first.select_rows(index)
        self.then.select_rows(index)


@dataclass
class FallbackRound:
    """A ``FallbackDrafter`` round: the rows whose tree came from ``first`` (``by_first [B]``), each drafter's own
    round state, and whether ``then`` proposed at all."""

    by_first: torch.Tensor
    first: Any
    then_drafted: bool = False
    then: Any = None


def _rows_from(pick: torch.Tensor, a: DraftTree, b: DraftTree) -> DraftTree:
    """Row ``r`` of ``a`` where ``pick[r]``, else of ``b``: both padded to one width with invalid nodes."""
    width = max(a.num_nodes, b.num_nodes)

    def padded(x: torch.Tensor, fill) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)

    def chosen(name: str, fill) -> torch.Tensor:
        return torch.where(pick[:, None], padded(getattr(a, name), fill), padded(getattr(b, name), fill))

    tokens, parents, valid = chosen("tokens", 0), chosen("parents", -1), chosen("valid", False)
    q = None
    if a.q is not None or b.q is not None:
        known = a.q if a.q is not None else b.q
        vocab, dtype = known.shape[-1], known.dtype

        def distributions(tree: DraftTree) -> torch.Tensor:  # (B, width, V); padding nodes: a point mass
            point_masses = torch.nn.functional.one_hot(padded(tree.tokens, 0), vocab).to(dtype)
            if tree.q is None:
                return point_masses
            return torch.cat([tree.q, point_masses[:, tree.num_nodes :]], 1)

        q = torch.where(pick[:, None, None], distributions(a), distributions(b))
    return DraftTree(tokens=tokens, parents=parents, valid=valid, q=q)
