"""``LinspecCache``: a Hugging Face ``Cache`` with a constant-size recurrent state for every linear layer.

Softmax layers of a hybrid keep an ordinary KV layer (growing). ``generate()`` works unchanged: the model class
creates this cache instead of a ``DynamicCache``. Speculative verification goes through ``begin_tree`` /
``commit_tree`` / ``discard_tree``; the cache's bookkeeping (columns seen, candidates) is private.

The KV-column helpers below serve both this cache's softmax layers and a plain softmax model's own cache.
"""

from __future__ import annotations

import torch

from linspec.errors import LinspecError
from linspec.models import hf
from linspec.models.context import TreeCandidates
from linspec.models.terms.base import LayerState
from linspec.ops.verify import TreeLayout


def truncate_kv_columns(layer, columns: int) -> None:
    """Drop a KV layer's columns past ``columns`` (uncommitted speculative candidates); a view, no copy."""
    kv = hf.kv_tensors(layer)
    if kv is not None and kv[0].shape[2] > columns:
        hf.set_kv_tensors(layer, kv[0][:, :, :columns], kv[1][:, :, :columns])


def is_leading_prefix(accepted: torch.Tensor, accepted_mask: torch.Tensor | None = None) -> bool:
    """Whether every row's accepted nodes are ``0, 1, …`` (where ``accepted_mask``): a chain accepted from its
    root, whose candidate columns already sit where the commit puts them (past a row's real entries the columns
    are dead whatever they hold)."""
    leading = accepted == torch.arange(accepted.shape[1], device=accepted.device)
    return bool((leading if accepted_mask is None else leading | ~accepted_mask.bool()).all())


def keep_kv_columns(layer, committed: int, accepted: torch.Tensor, in_place: bool | None = None) -> None:
    """Compact a KV layer after tree verification: keep its first ``committed`` columns, then the candidate
    columns ``committed + accepted[b, j]`` (``[B, M]``, each row's accepted path) — written in place over the
    candidates, so nothing before ``committed`` is copied. Rows that accepted fewer than ``M`` tokens carry
    whatever index they were padded with; the caller masks those columns.

    ``in_place`` (``is_leading_prefix(accepted)``, computed when None; callers with many layers pass it once):
    the accepted columns are already in place, and the commit is a crop.
    """
    kv = hf.kv_tensors(layer)
    if kv is None:
        return
    width = accepted.shape[1]
    if is_leading_prefix(accepted) if in_place is None else in_place:
        truncate_kv_columns(layer, committed + width)
        return
    kept = []
    for x in kv:  # (B, Hkv, committed + N, D)
        batch, heads, _, dim = x.shape
        index = accepted[:, None, :, None].expand(batch, heads, width, dim)
        x[:, :, committed : committed + width] = x[:, :, committed:].gather(2, index)  # (B, Hkv, M, D)
        kept.append(x[:, :, : committed + width])
    hf.set_kv_tensors(layer, *kept)


def gather_kv_columns(layer, order: torch.Tensor) -> None:
    """Keep columns ``order [B, W]`` of each row (repacking: dead columns squeezed out, order preserved)."""
    kv = hf.kv_tensors(layer)
    if kv is None:
        return
    width = order.shape[1]
    hf.set_kv_tensors(
        layer, *(x.gather(2, order[:, None, :, None].expand(x.shape[0], x.shape[1], width, x.shape[3])) for x in kv)
    )


def select_kv_rows(layer, index: torch.Tensor) -> None:
    """Keep batch rows ``index`` of a KV layer."""
    kv = hf.kv_tensors(layer)
    if kv is not None:
        hf.set_kv_tensors(layer, kv[0][index], kv[1][index])


def kv_nbytes(layer) -> int:
    kv = hf.kv_tensors(layer)
    return 0 if kv is None else sum(x.numel() * x.element_size() for x in kv)


def cache_nbytes(cache) -> int:
    """Bytes held by any cache: a ``LinspecCache`` (constant in context length) or a model's own KV cache."""
    return (
        cache.nbytes() if isinstance(cache, LinspecCache) else sum(kv_nbytes(layer) for layer in hf.cache_layers(cache))
    )


def new_cache_for(model):
    """A fresh cache for ``model``: its ``LinspecCache`` when it is a linspec model, else its own KV cache."""
    new_cache = getattr(model, "new_cache", None)
    return new_cache() if new_cache is not None else hf.new_kv_cache(model.config)


class LinearStateLayer:
    """One linear layer's slot in the cache: its ``LayerState`` (or None before the first token)."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False
    is_croppable = False

    def __init__(self) -> None:
        self.state: LayerState | None = None

    def __repr__(self) -> str:
        return f"LinearStateLayer(position={None if self.state is None else self.state.position.tolist()})"

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.position.shape[0]

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def lazy_initialization(self, *args, **kwargs) -> None:
        """States are created by the attention layer on first use; nothing to pre-allocate."""

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise LinspecError(
            "a linear-attention state cannot be cropped; speculative decoding with linspec commits accepted tokens "
            "instead (use linspec.speculative_generate)"
        )

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        """The state is small and stays where it is."""

    def prefetch(self) -> None:
        """The state is small and stays where it is."""


class LinspecCache(hf.Cache):
    """Per-layer recurrent states for linear layers and KV for softmax layers.

    The cache counts the input columns processed (padding included), which is what Hugging Face means by its
    sequence length; each linear state separately counts the *real* tokens of each row.
    """

    def __init__(
        self, num_layers: int, softmax_layers: tuple[int, ...] = (), head_layers: tuple[int, ...] = ()
    ) -> None:
        """``head_layers``: linear layers with softmax heads; each also gets a KV layer for those heads' columns."""
        layers = [hf.DynamicLayer() if i in softmax_layers else LinearStateLayer() for i in range(num_layers)]
        super().__init__(layers=layers)
        self.head_kv = {i: hf.DynamicLayer() for i in sorted(set(head_layers))}
        self._columns = 0
        self._tree: TreeCandidates | None = None

    def __repr__(self) -> str:  # one line, not a line per layer
        kinds = sum(isinstance(layer, LinearStateLayer) for layer in self.layers)
        return f"LinspecCache(layers={len(self.layers)}, linear={kinds}, columns={self._columns})"

    @classmethod
    def for_model_config(cls, config) -> LinspecCache:
        text_config = config.get_text_config(decoder=True)
        settings = text_config.linspec_settings
        heads = tuple(layer for layer, _ in settings.softmax_heads)
        return cls(text_config.num_hidden_layers, settings.softmax_layers, heads)

    def linear_state(self, layer_idx: int) -> LayerState | None:
        return self.layers[layer_idx].state

    def set_linear_state(self, layer_idx: int, state: LayerState) -> None:
        self.layers[layer_idx].state = state

    def append_head_kv(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the softmax heads' columns of linear layer ``layer_idx``; all its columns so far come back."""
        return hf.append_kv(self.head_kv[layer_idx], keys, values)

    def kv_layers(self) -> list:
        """The growing-KV layers: a hybrid's softmax layers, then the softmax heads' layers (empty for a fully
        linear model). All hold the same columns, so commits, repacking and the masks treat them alike."""
        softmax = [layer for layer in self.layers if not isinstance(layer, LinearStateLayer)]
        return softmax + list(self.head_kv.values())

    def advance(self, num_columns: int) -> None:
        """Called once per model forward that committed ``num_columns`` new input columns in every layer."""
        self._columns += num_columns

    def begin_tree(self, layout: TreeLayout) -> TreeCandidates:
        """Start a verification pass: softmax layers drop candidate columns a previous pass left; linear layers
        will leave their candidates in the returned object (pass it in the ``ExecutionContext``)."""
        self.discard_tree()
        self._tree = TreeCandidates(layout)
        return self._tree

    def discard_tree(self) -> None:
        """Forget an open verification pass; nothing committed changes."""
        for layer in self.kv_layers():
            truncate_kv_columns(layer, self._columns)
        self._tree = None

    def commit_tree(self, candidates: TreeCandidates, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        """Commit the accepted path of the verification pass ``candidates`` in every layer.

        ``accepted [B, M]`` holds node indices along each row's path (root first), ``accepted_mask [B, M]`` its real
        entries. Linear layers append the kept ``(k̂, v)`` (nothing is recomputed); softmax layers keep their
        committed columns plus the accepted candidates' columns — a padded entry's column stays as a dead column
        the caller masks.
        """
        if candidates is not self._tree:
            raise RuntimeError("this verification pass is no longer open (a newer one began or it was discarded)")
        if accepted.shape[1] > 0:
            self._append_linear(candidates, accepted, accepted_mask)
        layers = self.kv_layers()
        in_place = is_leading_prefix(accepted, accepted_mask) if layers else False
        for layer in layers:
            keep_kv_columns(layer, self._columns, accepted, in_place)
        self._tree = None
        self._columns += accepted.shape[1]

    def _append_linear(self, candidates: TreeCandidates, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        """Commit the accepted path in every linear layer: each kind of term commits all of its layers in one call
        (``Term.commit_layers``, which may batch them), then each layer's position advances once."""
        entries = candidates.entries()
        by_kind: dict[type, list[tuple[int, object, object]]] = {}
        for layer_idx, kept in entries.items():
            for term, entry in kept.items():
                by_kind.setdefault(type(term), []).append((layer_idx, term, entry))
        slices: dict[int, dict[str, object]] = {layer_idx: {} for layer_idx in entries}
        for kind, items in by_kind.items():
            batch = [(term, self.layers[layer_idx].state, entry) for layer_idx, term, entry in items]
            for (layer_idx, term, _), part in zip(
                items, kind.commit_layers(batch, accepted, accepted_mask), strict=True
            ):
                slices[layer_idx][term.name] = part
        count = accepted_mask.sum(dim=1)
        for layer_idx, parts in slices.items():
            self.layers[layer_idx].state = self.layers[layer_idx].state.advanced(parts, count)

    def compact_columns(self, order: torch.Tensor) -> None:
        """Keep KV columns ``order [B, W]`` of each row (dead columns squeezed out); ``W`` columns remain."""
        self.discard_tree()
        for layer in self.kv_layers():
            gather_kv_columns(layer, order)
        self._columns = order.shape[1]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` in every layer."""
        self.discard_tree()
        for layer in self.layers:
            if isinstance(layer, LinearStateLayer):
                layer.batch_select_indices(index)
        for layer in self.kv_layers():
            select_kv_rows(layer, index)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._columns

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        layers = self.kv_layers()
        if not layers:
            return self._columns + query_length, 0
        return layers[0].get_mask_sizes(query_length)

    def reset(self) -> None:
        super().reset()
        for layer in self.head_kv.values():
            layer.reset()
        self._columns = 0
        self._tree = None

    # generate()'s batch reshaping (beam search, several sequences per prompt) reaches ``self.layers`` only.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for layer in self.head_kv.values():
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for layer in self.head_kv.values():
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for layer in self.head_kv.values():
            layer.batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes held by the cache: constant in context length for linear layers, growing for softmax KV."""
        linear = sum(layer.nbytes() for layer in self.layers if isinstance(layer, LinearStateLayer))
        return linear + sum(kv_nbytes(layer) for layer in self.kv_layers())
