"""``ModelRunner``: a causal LM plus its cache, advanced only by committed tokens, driven layer by layer.

This is the execution API speculative decoding stands on, for every model role (target or drafter; linspec,
hybrid or plain softmax):

* ``extend(tokens, mask)`` commits tokens directly (prefill, padding allowed);
* ``begin_tree(tokens, parents)`` opens a verification pass — a ``TreePass`` whose ``run_layers`` evaluates a
  tree of candidates without changing anything committed — and ``TreePass.commit(path)`` / ``discard()`` ends it;
* ``run_layers(hidden, start, end, ctx)`` runs decoder layers ``[start, end)`` under an explicit ``RunContext``
  (positions, rotary embeddings, softmax masks, and the linspec ``ExecutionContext`` that says *tree* or not);
* ``select_rows`` drops finished rows.

Softmax KV (a plain model's cache or the softmax layers of a hybrid) is laid out in columns that all rows share;
``kv_valid [B, C]`` marks each row's real columns (left padding of the prompt, the unused tail of a row that
accepted fewer tokens than another). Every forward gets an explicit additive mask built from it — windowed for
sliding-window layers, from each column's true position — so a row never sees another row's padding and
positions are each row's own. Linear layers keep their own per-row count of real tokens and need no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linspec.models import hf
from linspec.models.cache import (
    LinspecCache,
    gather_kv_columns,
    is_leading_prefix,
    keep_kv_columns,
    select_kv_rows,
    truncate_kv_columns,
)
from linspec.models.context import ExecutionContext
from linspec.ops.verify import TreeLayout

# Repack the softmax KV when more than this share of its columns are dead (and there are at least _REPACK_MIN).
_REPACK_FRACTION = 0.5
_REPACK_MIN = 64


def model_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


@dataclass(frozen=True)
class RunContext:
    """Everything decoder layers need besides the hidden states, for one forward over ``T`` new columns."""

    positions: torch.Tensor  # (B, T) each column's true position in its row
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin for ``positions``
    masks: dict[int | None, torch.Tensor | None]  # additive softmax mask per sliding window (None: full attention)
    linspec: ExecutionContext  # what linear layers do with the columns


class TreePass:
    """An open verification pass over a tree of candidates (from ``ModelRunner.begin_tree``).

    ``hidden`` holds the candidates' embeddings ``[B, N, H]``; ``run_layers`` may be called for any range of
    layers, in order, any number of times (a drafter runs the first layers, the verification continues from
    there). ``commit`` keeps one path per row and ends the pass; ``discard`` ends it keeping nothing.
    """

    def __init__(self, runner: ModelRunner, hidden: torch.Tensor, context: RunContext) -> None:
        self._runner = runner
        self.hidden = hidden
        self.context = context

    def run_layers(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        self._runner._check_open(self)
        return self._runner.run_layers(hidden, start, end, self.context)

    def commit(self, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        """Keep nodes ``accepted [B, M]`` (path order; real where ``accepted_mask``); the pass ends."""
        self._runner._commit(self, accepted, accepted_mask)

    def discard(self) -> None:
        if self._runner._open is self:
            self._runner._discard()


class ModelRunner:
    """One model's cache for a batch of ``batch`` rows; ``length[b]`` real tokens of row ``b`` are committed."""

    def __init__(self, model, batch: int) -> None:
        self.parts = hf.DecoderParts(model)
        self.model = model
        self.num_layers = self.parts.num_layers
        self.hidden_size = self.parts.hidden_size
        self.vocab_size = model_vocab_size(model)
        weight = self.parts.head.weight
        self.device, self.dtype = weight.device, weight.dtype
        new_cache = getattr(model, "new_cache", None)
        # A plain softmax model gets full KV layers whatever its config says: sliding-window layers would evict
        # columns a tree pass still needs; the windows are applied by the masks instead, exactly.
        self.cache = new_cache() if new_cache is not None else hf.new_full_kv_cache(self.num_layers)
        self.is_linspec = isinstance(self.cache, LinspecCache)
        self.kv_layers = self.cache.kv_layers() if self.is_linspec else hf.kv_layers(self.cache)
        self.windows = hf.sliding_windows(model.config.get_text_config(decoder=True), self.num_layers)
        self.length = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.kv_valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # (B, C) real KV columns
        self._open: TreePass | None = None

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    @property
    def columns(self) -> int:
        return self.kv_valid.shape[1]

    def _masks(self, positions: torch.Tensor, allowed_new: torch.Tensor) -> dict[int | None, torch.Tensor | None]:
        """Additive masks ``[B, 1, T, C + T]`` per distinct window: committed real columns, then ``allowed_new``
        ``[B, T, T]``; a windowed layer also drops keys ``window`` or more positions behind the query."""
        if not self.kv_layers:
            return {}
        batch, length, _ = allowed_new.shape
        allowed = torch.cat([self.kv_valid[:, None, :].expand(batch, length, self.columns), allowed_new], dim=2)
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(self.windows):
            keep = allowed
            if window is not None:
                key_positions = torch.cat([self.kv_valid.long().cumsum(1) - 1, positions], dim=1)  # (B, C + T)
                keep = allowed & (positions[:, :, None] - key_positions[:, None, :] < window)
            mask = torch.zeros(keep.shape, dtype=self.dtype, device=self.device)
            masks[window] = mask.masked_fill_(~keep, torch.finfo(self.dtype).min)[:, None]
        return masks

    def run_layers(self, hidden: torch.Tensor, start: int, end: int | None, context: RunContext) -> torch.Tensor:
        """Decoder layers ``[start, end)`` on ``hidden [B, T, H]`` (the pre-norm residual stream)."""
        extra = {"linspec_context": context.linspec} if self.is_linspec else {}
        for index in range(start, self.num_layers if end is None else end):
            hidden = self.parts.run_layer(
                index,
                hidden,
                attention_mask=context.masks.get(self.windows[index]),
                rotary=context.rotary,
                positions=context.positions,
                cache=self.cache,
                extra=extra,
            )
        return hidden

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Commit ``tokens [B, T]`` (real where ``token_mask``; real tokens right-aligned, i.e. left padding).

        Returns the final hidden state (after the last norm) of the last column ``[B, H]`` — each row's last
        real token when it has one.
        """
        length = tokens.shape[1]
        if token_mask is None:
            token_mask = torch.ones_like(tokens, dtype=torch.bool)
        token_mask = token_mask.bool()
        self._discard()
        positions = self.length[:, None] + (token_mask.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=self.device)
        allowed_new = (causal & token_mask[:, None, :]) | eye  # a padding column sees itself only; it is dead
        hidden = self.parts.embed(tokens)
        all_real = bool(token_mask.all())
        # One real token after real columns, no window in reach: no mask at all (SDPA's fastest path).
        in_window = all(w is None or int(self.length.max()) < w for w in self.windows)
        unmasked = length == 1 and all_real and bool(self.kv_valid.all()) and in_window
        context = RunContext(
            positions=positions,
            rotary=self.parts.rotary(hidden, positions),
            masks={w: None for w in set(self.windows)} if unmasked else self._masks(positions, allowed_new),
            linspec=ExecutionContext(token_mask=None if all_real else token_mask),
        )
        hidden = self.run_layers(hidden, 0, None, context)
        if self.kv_layers:
            self.kv_valid = torch.cat([self.kv_valid, token_mask], dim=1)
        if self.is_linspec:
            self.cache.advance(length)
        self.length = self.length + token_mask.sum(1)
        return self.parts.final_norm(hidden[:, -1])

    def begin_tree(self, tokens: torch.Tensor, parents: torch.Tensor) -> TreePass:
        """Open a verification pass over a tree of candidates (``parents [B, N]``, -1 = follows the committed
        context); a pass still open is discarded first.

        Node ``n`` sits at position ``length + depth(n)`` and sees the committed context and its own ancestors.
        Nothing committed changes until ``commit``.
        """
        self._discard()
        layout = TreeLayout.of(parents)  # built once, shared by the masks and every linear layer
        positions = self.length[:, None] + layout.depth
        candidates = self.cache.begin_tree(layout) if self.is_linspec else None
        hidden = self.parts.embed(tokens)
        context = RunContext(
            positions=positions,
            rotary=self.parts.rotary(hidden, positions),
            masks=self._masks(positions, layout.ancestors),
            linspec=ExecutionContext(tree=candidates),
        )
        self._open = TreePass(self, hidden, context)
        return self._open

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parts.final_norm(hidden)

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Logits, upcast to float32 when the model runs in 16-bit (sampling needs the precision)."""
        logits = self.parts.head(final_hidden)
        return logits.float() if logits.element_size() < 4 else logits

    @torch.no_grad()
    def tree_logits(self, tokens: torch.Tensor, parents: torch.Tensor) -> tuple[TreePass, torch.Tensor]:
        """Open a pass and evaluate it: ``(pass, logits [B, N, V])``, each node's logits equal to sequential
        decoding along its path."""
        tree = self.begin_tree(tokens, parents)
        return tree, self.logits(self.final_hidden(tree.run_layers(tree.hidden)))

    def _check_open(self, tree: TreePass) -> None:
        if tree is not self._open:
            raise RuntimeError("this verification pass is no longer open (a newer one began, or it ended)")

    def _commit(self, tree: TreePass, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        self._check_open(tree)
        accepted_mask = accepted_mask.bool()
        accepted = torch.where(accepted_mask, accepted, 0)
        if self.is_linspec:
            self.cache.commit_tree(tree.context.linspec.tree, accepted, accepted_mask)
        else:
            in_place = is_leading_prefix(accepted, accepted_mask)  # a chain accepted from its root: a crop
            for layer in self.kv_layers:
                keep_kv_columns(layer, self.columns, accepted, in_place)
        if self.kv_layers:
            self.kv_valid = torch.cat([self.kv_valid, accepted_mask], dim=1)
        self.length = self.length + accepted_mask.sum(1)
        self._open = None
        self._maybe_repack()

    def _discard(self) -> None:
        """End an open pass keeping nothing (nothing committed changes)."""
        if self.is_linspec:
            self.cache.discard_tree()
        else:
            for layer in self.kv_layers:
                truncate_kv_columns(layer, self.columns)
        self._open = None

    def _maybe_repack(self) -> None:
        """Squeeze dead KV columns out once they are the majority: each row's real columns first, in order."""
        if not self.kv_layers or self.columns < _REPACK_MIN:
            return
        width = int(self.kv_valid.sum(1).max())
        if width > self.columns * (1 - _REPACK_FRACTION):
            return
        order = torch.sort((~self.kv_valid).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (B, W)
        if self.is_linspec:
            self.cache.compact_columns(order)
        else:
            for layer in self.kv_layers:
                gather_kv_columns(layer, order)
        self.kv_valid = self.kv_valid.gather(1, order)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (finished rows leave the batch)."""
        self._discard()
        if self.is_linspec:
            self.cache.select_rows(index)
        else:
            for layer in self.kv_layers:
                select_kv_rows(layer, index)
        self.length = self.length[index]
        self.kv_valid = self.kv_valid[index]
        self._maybe_repack()
