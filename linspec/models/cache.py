"""``LinspecCache``: a Hugging Face ``Cache`` with a constant-size recurrent state for every linear layer.

Softmax layers of a hybrid keep an ordinary ``DynamicLayer`` (growing KV). ``generate()`` works unchanged:
the model class creates this cache instead of a ``DynamicCache``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from linspec.errors import LinspecError
from linspec.ops import LinearAttentionState, append_tokens
from linspec.ops.memory import GlobalMemory
from linspec.ops.verify import TreeLayout


def truncate_kv_columns(layer: DynamicLayer, columns: int) -> None:
    """Drop a softmax layer's columns past ``columns`` (uncommitted speculative candidates); a view, no copy."""
    if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[2] > columns:
        layer.keys = layer.keys[:, :, :columns]
        layer.values = layer.values[:, :, :columns]


def is_leading_prefix(accepted: torch.Tensor, accepted_mask: torch.Tensor | None = None) -> bool:
    """Whether every row's accepted nodes are ``0, 1, …`` (where ``accepted_mask``): a chain accepted from its
    root, whose candidate columns already sit where the commit puts them (past a row's real entries the columns
    are dead whatever they hold)."""
    leading = accepted == torch.arange(accepted.shape[1], device=accepted.device)
    return bool((leading if accepted_mask is None else leading | ~accepted_mask.bool()).all())


def keep_kv_columns(layer: DynamicLayer, committed: int, accepted: torch.Tensor, in_place: bool | None = None) -> None:
    """Compact a softmax layer after tree verification: keep its first ``committed`` columns, then the candidate
    columns ``committed + accepted[b, j]`` (``[B, M]``, each row's accepted path) — written in place over the
    candidates, so nothing before ``committed`` is copied. Rows that accepted fewer than ``M`` tokens carry
    whatever index they were padded with; the caller masks those columns.

    ``in_place`` (``is_leading_prefix(accepted)``, computed when None; callers with many layers pass it once):
    the accepted columns are already in place, and the commit is a crop.
    """
    if not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4:
        return
    if is_leading_prefix(accepted) if in_place is None else in_place:
        truncate_kv_columns(layer, committed + accepted.shape[1])
        return
    width = accepted.shape[1]
    for name in ("keys", "values"):
        x = getattr(layer, name)  # (B, H, committed + N, D)
        batch, heads, _, dim = x.shape
        index = accepted[:, None, :, None].expand(batch, heads, width, dim)
        picked = x[:, :, committed:].gather(2, index)  # (B, H, M, D)
        x[:, :, committed : committed + width] = picked
        setattr(layer, name, x[:, :, : committed + width])


class LinearStateLayer:
    """One linear layer's slot in the cache: a ``LinearAttentionState`` (or None before the first token)."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False
    is_croppable = False

    def __init__(self) -> None:
        self.state: LinearAttentionState | None = None

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


class LinspecCache(Cache):
    """Per-layer recurrent states for linear layers and KV for softmax layers.

    ``seen_tokens`` counts the input columns processed (padding included), which is what Hugging Face means by
    the cache's sequence length; each linear state separately counts the *real* tokens of each row.
    """

    def __init__(self, num_layers: int, softmax_layers: tuple[int, ...] = ()) -> None:
        layers = [DynamicLayer() if i in softmax_layers else LinearStateLayer() for i in range(num_layers)]
        super().__init__(layers=layers)
        self.seen_tokens = 0
        # Speculative verification (DESIGN §3): while ``tree`` (the tree's layout: parents [B, N], -1 = follows
        # the committed context) is set, linear layers run verify mode, leave their state alone and park the
        # candidates' (k̂, v).
        self.tree: TreeLayout | None = None
        self.candidates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.memories: dict[int, GlobalMemory | None] = {}  # how each verifying layer folds its S on commit

    @classmethod
    def for_model_config(cls, config) -> LinspecCache:
        text_config = config.get_text_config(decoder=True)
        return cls(text_config.num_hidden_layers, tuple(text_config.linspec["softmax_layers"]))

    def linear_state(self, layer_idx: int) -> LinearAttentionState | None:
        return self.layers[layer_idx].state

    def set_linear_state(self, layer_idx: int, state: LinearAttentionState) -> None:
        self.layers[layer_idx].state = state

    def store_candidates(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, memory: GlobalMemory | None = None
    ) -> None:
        self.candidates[layer_idx] = (keys, values)
        self.memories[layer_idx] = memory

    def commit_linear(self, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        """Append the accepted candidates' parked ``(k̂, v)`` to every linear state; nothing is recomputed.

        ``accepted`` ``[B, M]`` holds node indices along each row's accepted path (root first), ``accepted_mask``
        ``[B, M]`` marks the real entries (rows accept different numbers of tokens).

        Every linear layer appends the same path at the same positions, so layers whose states have the same
        shapes are stacked along the batch axis and appended in one ``append_tokens`` call: per layer it is a
        few dozen small tensor ops, whose fixed cost would otherwise be paid once per layer every round. A layer
        with a decayed memory folds with its own λ, so it is appended on its own.
        """
        batch = accepted.shape[0]
        stacks: dict[tuple, list[int]] = {}
        for layer_idx, (keys, values) in self.candidates.items():
            state = self.layers[layer_idx].state
            memory = self.memories.get(layer_idx)
            own = layer_idx if memory is not None and memory.log_decay is not None else None
            norm = None if memory is None else memory.norm
            shapes = (keys.shape, values.shape, *(t.shape for t in state.tensors().values()), norm, own)
            stacks.setdefault(shapes, []).append(layer_idx)
        for layer_ids in stacks.values():
            states = [self.layers[i].state for i in layer_ids]
            stacked = LinearAttentionState(
                **{name: torch.cat([getattr(s, name) for s in states]) for name in states[0].tensors()}
            )
            keys = torch.cat([self.candidates[i][0] for i in layer_ids])
            values = torch.cat([self.candidates[i][1] for i in layer_ids])
            path = accepted.repeat(len(layer_ids), 1)

            def along_path(x: torch.Tensor, path=path) -> torch.Tensor:
                return x.gather(2, path[:, None, :, None].expand(x.shape[0], x.shape[1], path.shape[1], x.shape[3]))

            memory = self.memories.get(layer_ids[0])
            mask = accepted_mask.repeat(len(layer_ids), 1)
            new = append_tokens(stacked, along_path(keys), along_path(values), mask, memory)
            for j, layer_idx in enumerate(layer_ids):
                self.layers[layer_idx].state = new.map(lambda t, j=j: t[j * batch : (j + 1) * batch])
        self.candidates, self.memories = {}, {}

    def softmax_layers(self) -> list[DynamicLayer]:
        """The growing-KV layers of a hybrid (empty for a fully linear model)."""
        return [layer for layer in self.layers if isinstance(layer, DynamicLayer)]

    def open_tree(self, parents: torch.Tensor | TreeLayout, committed_columns: int) -> None:
        """Start a verification pass over a tree (``parents [B, N]`` or its layout): linear layers switch to verify
        mode; softmax layers drop any candidate columns a previous pass left past ``committed_columns``."""
        for layer in self.softmax_layers():
            truncate_kv_columns(layer, committed_columns)
        self.candidates, self.memories = {}, {}
        self.tree = parents if isinstance(parents, TreeLayout) else TreeLayout.of(parents)

    def commit_tree(self, accepted: torch.Tensor, accepted_mask: torch.Tensor, committed_columns: int) -> None:
        """Commit the accepted path of the last verification pass in every layer, then leave verify mode.

        Linear layers append the parked ``(k̂, v)`` (``commit_linear``); softmax layers keep their first
        ``committed_columns`` columns plus the accepted candidates' columns (``accepted [B, M]``). Columns of
        padded entries (``accepted_mask`` False) stay in softmax layers as dead columns the caller masks.
        """
        if accepted.shape[1] > 0:
            self.commit_linear(accepted, accepted_mask)
        self.candidates, self.memories = {}, {}
        softmax_layers = self.softmax_layers()
        in_place = is_leading_prefix(accepted, accepted_mask) if softmax_layers else False
        for layer in softmax_layers:
            keep_kv_columns(layer, committed_columns, accepted, in_place)
        self.tree = None
        self.seen_tokens = committed_columns + accepted.shape[1]

    def _first_softmax_layer(self) -> int | None:
        return next((i for i, layer in enumerate(self.layers) if isinstance(layer, DynamicLayer)), None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        softmax = self._first_softmax_layer()
        if softmax is None:
            return self.seen_tokens + query_length, 0
        return self.layers[softmax].get_mask_sizes(query_length)

    def advance(self, num_columns: int) -> None:
        """Called once per model forward, after all layers ran on ``num_columns`` new input columns."""
        self.seen_tokens += num_columns

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes held by the cache: constant in context length for linear layers."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, LinearStateLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total
