"""``ModelSession``: a causal LM plus its cache, advanced only by committed tokens.

Three operations cover every model role in speculative decoding (target or drafter, linspec, hybrid or plain
softmax): ``extend`` commits tokens directly (prefill, padding allowed); ``open_tree`` + ``run_layers`` evaluate
a tree of candidates without changing any committed state; ``commit`` keeps one path of that tree.

Softmax KV (a plain HF model's ``DynamicCache`` or the softmax layers of a hybrid) is laid out in columns that
all rows share; ``kv_valid [B, C]`` marks each row's real columns (left padding of the prompt, the unused tail of
a row that accepted fewer tokens than another). Every forward gets an explicit additive mask built from it, so a
row never sees another row's padding and positions (``position_ids``) are each row's own. Linear layers keep
their own per-row count of real tokens and need no mask.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from linspec.errors import LinspecError
from linspec.models.cache import LinspecCache, is_leading_prefix, keep_kv_columns, truncate_kv_columns
from linspec.ops.verify import TreeLayout

# Repack the softmax KV when more than this share of its columns are dead (and there are at least _REPACK_MIN).
_REPACK_FRACTION = 0.5
_REPACK_MIN = 64


def model_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


class ModelSession:
    """One model's cache for a batch of ``batch`` rows; ``length[b]`` real tokens of row ``b`` are committed."""

    def __init__(self, model, batch: int) -> None:
        decoder = model.get_decoder()
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, n)]
        if missing:
            raise LinspecError(
                f"{type(model).__name__} is not a Llama-family decoder (no {', '.join(missing)}); speculative "
                "generation supports linspec models and Llama, Mistral, Qwen2, Qwen3-style softmax models"
            )
        self.model = model
        self.decoder = decoder
        self.head = model.get_output_embeddings()
        self.num_layers = len(decoder.layers)
        self.hidden_size = decoder.norm.weight.shape[0]
        self.vocab_size = model_vocab_size(model)
        weight = self.head.weight
        self.device, self.dtype = weight.device, weight.dtype
        new_cache = getattr(model, "new_cache", None)
        self.cache = new_cache() if new_cache is not None else DynamicCache(config=model.config)
        self.is_linspec = isinstance(self.cache, LinspecCache)
        sliding = [type(layer).__name__ for layer in self.cache.layers if type(layer) not in (DynamicLayer,)]
        if not self.is_linspec and sliding:
            raise LinspecError(
                f"speculative generation needs full-attention KV layers; this model's cache has {sliding[0]}"
            )
        self.kv_layers = [layer for layer in self.cache.layers if type(layer) is DynamicLayer]
        self.length = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.kv_valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # (B, C) real KV columns
        self._tree: dict | None = None

    @property
    def batch(self) -> int:
        return self.length.shape[0]

    @property
    def columns(self) -> int:
        return self.kv_valid.shape[1]

    def _additive_mask(self, allowed_new: torch.Tensor) -> torch.Tensor | None:
        """``[B, 1, T, C + T]`` additive mask: committed real columns, then ``allowed_new [B, T, T]``."""
        if not self.kv_layers:
            return None
        batch, length, _ = allowed_new.shape
        allowed = torch.cat([self.kv_valid[:, None, :].expand(batch, length, self.columns), allowed_new], dim=2)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    def _layers(self, hidden: torch.Tensor, start: int, end: int, context: dict) -> torch.Tensor:
        for layer in self.decoder.layers[start:end]:
            hidden = layer(
                hidden,
                attention_mask=context["mask"],
                position_embeddings=context["rope"],
                position_ids=context["positions"],
                past_key_values=self.cache,
                use_cache=True,
                **context["extra"],
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
        self._close_tree()
        positions = self.length[:, None] + (token_mask.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=self.device)
        allowed_new = (causal & token_mask[:, None, :]) | eye  # a padding column sees itself only; it is dead
        hidden = self.decoder.embed_tokens(tokens)
        # One real token after real columns only: no mask at all (SDPA's fastest path, as in plain decoding).
        unmasked = length == 1 and bool(token_mask.all()) and bool(self.kv_valid.all())
        context = {
            "mask": None if unmasked else self._additive_mask(allowed_new),
            "rope": self.decoder.rotary_emb(hidden, positions),
            "positions": positions,
            "extra": {"linspec_token_mask": token_mask} if self.is_linspec and not bool(token_mask.all()) else {},
        }
        hidden = self._layers(hidden, 0, self.num_layers, context)
        if self.kv_layers:
            self.kv_valid = torch.cat([self.kv_valid, token_mask], dim=1)
        if self.is_linspec:
            self.cache.advance(length)
        self.length = self.length + token_mask.sum(1)
        return self.decoder.norm(hidden[:, -1])

    def open_tree(self, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Start evaluating a tree of candidates (``parents [B, N]``, -1 = follows the committed context).

        Node ``n`` sits at position ``length + depth(n)`` and sees the committed context and its own ancestors.
        Nothing committed changes. Returns the embeddings ``[B, N, H]`` to pass to ``run_layers``.
        """
        layout = TreeLayout.of(parents)  # built once, shared by the mask and every linear layer
        positions = self.length[:, None] + layout.depth
        if self.is_linspec:
            self.cache.open_tree(layout, self.columns)
        else:
            for layer in self.kv_layers:
                truncate_kv_columns(layer, self.columns)
        hidden = self.decoder.embed_tokens(tokens)
        self._tree = {
            "mask": self._additive_mask(layout.ancestors),
            "rope": self.decoder.rotary_emb(hidden, positions),
            "positions": positions,
            "extra": {},
            "size": tokens.shape[1],
        }
        return hidden

    @torch.no_grad()
    def run_layers(self, hidden: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run decoder layers ``[start, end)`` of the open tree on ``hidden [B, N, H]`` (pre-norm residual stream)."""
        if self._tree is None:
            raise RuntimeError("run_layers needs an open tree (call open_tree first)")
        return self._layers(hidden, start, self.num_layers if end is None else end, self._tree)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.norm(hidden)

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Logits, upcast to float32 when the model runs in 16-bit (sampling needs the precision)."""
        logits = self.head(final_hidden)
        return logits.float() if logits.element_size() < 4 else logits

    @torch.no_grad()
    def tree_logits(self, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, N, V]`` of every node of a tree — each equal to sequential decoding along its path."""
        hidden = self.run_layers(self.open_tree(tokens, parents))
        return self.logits(self.final_hidden(hidden))

    def commit(self, accepted: torch.Tensor, accepted_mask: torch.Tensor) -> None:
        """Keep nodes ``accepted [B, M]`` (path order; real where ``accepted_mask``) of the open tree; close it."""
        if self._tree is None:
            raise RuntimeError("commit needs an open tree")
        accepted_mask = accepted_mask.bool()
        accepted = torch.where(accepted_mask, accepted, 0)
        if self.is_linspec:
            self.cache.commit_tree(accepted, accepted_mask, self.columns)
        else:
            in_place = is_leading_prefix(accepted, accepted_mask)  # a chain accepted from its root: a crop
            for layer in self.kv_layers:
                keep_kv_columns(layer, self.columns, accepted, in_place)
        if self.kv_layers:
            self.kv_valid = torch.cat([self.kv_valid, accepted_mask], dim=1)
        self.length = self.length + accepted_mask.sum(1)
        self._tree = None
        self._maybe_repack()

    def _close_tree(self) -> None:
        """Discard an open tree's candidates (nothing committed changes)."""
        if self.is_linspec:
            self.cache.tree = None
            self.cache.candidates = {}
        for layer in self.kv_layers:
            truncate_kv_columns(layer, self.columns)
        self._tree = None

    def _maybe_repack(self) -> None:
        """Squeeze dead KV columns out once they are the majority: each row's real columns first, in order."""
        if not self.kv_layers or self.columns < _REPACK_MIN:
            return
        real = self.kv_valid.sum(1)
        width = int(real.max())
        if width > self.columns * (1 - _REPACK_FRACTION):
            return
        order = torch.sort((~self.kv_valid).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (B, W)
        for layer in self.kv_layers:
            for name in ("keys", "values"):
                x = getattr(layer, name)
                index = order[:, None, :, None].expand(x.shape[0], x.shape[1], width, x.shape[3])
                setattr(layer, name, x.gather(2, index))
        self.kv_valid = self.kv_valid.gather(1, order)
        if self.is_linspec:
            self.cache.seen_tokens = width

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (finished rows leave the batch)."""
        self._close_tree()
        for layer in self.cache.layers:
            if isinstance(layer, DynamicLayer):
                if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
                    layer.keys, layer.values = layer.keys[index], layer.values[index]
            else:
                layer.batch_select_indices(index)
        self.length = self.length[index]
        self.kv_valid = self.kv_valid[index]
        self._maybe_repack()
