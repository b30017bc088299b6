"""The vLLM model classes of every linspec architecture: linspec's own layers, with each linear layer's decode state
kept by vLLM as constant-size state per request and, in hybrids, the softmax parts' keys and values in vLLM's
paged KV cache.

vLLM schedules a batch of requests as one flat run of tokens: decodes (one token each) first, then prefills or
prefill chunks, each continuing from whatever its request has fed the model so far. The model runs the linspec
causal LM (the Hugging Face class, weights from the saved directory) layer by layer through ``hf.DecoderParts``
on that flat run. Norms, MLPs and softmax layers take it whole (a softmax layer's attention is vLLM's paged
``Attention``, ``linspec.serving.softmax``); a linear layer takes it in segments — all decodes as one batch in
linspec's recurrent step, then each prefill in linspec's extend mode — each on its requests' state rows, read
from vLLM's pages before the segment and written back after it (``linspec.serving.state``), so vLLM owns the
memory, the slots and their reuse.

Each linear layer is represented to vLLM by a ``LinspecStateLayer`` (vLLM's ``MambaBase``): it declares the
state's shapes and dtypes, receives the pages vLLM allocates, is how the engine finds the per-request slots
(``LinearAttentionMetadata``), and during a forward stands in the decoder layer for linspec's attention module to
cut the flat run into segments. An all-linear model is attention-free for vLLM (``LinspecForCausalLM``); a hybrid
is vLLM's kind of hybrid (``LinspecHybridForCausalLM``), whose attention pages vLLM sizes to hold a state page.
Under tensor parallelism each rank runs its own kv heads' part of the model (``linspec.serving.sharding``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree, IsHybrid
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from linspec.models import hf
from linspec.models.cache import LinspecCache
from linspec.models.context import ExecutionContext
from linspec.models.modeling import linspec_classes_of
from linspec.models.terms.heads import SoftmaxHeadsTerm
from linspec.serving.architecture import keeps_softmax
from linspec.serving.sharding import rank_config, reduce_row_parallel_outputs, shard
from linspec.serving.softmax import PagedHeadsTerm, route_softmax_layers
from linspec.serving.state import (
    compute_dtype,
    config_state_layout,
    linear_attentions,
    read_states,
    state_layout,
    write_states,
)


@dataclass(frozen=True)
class Segment:
    """Flat tokens ``begin:end`` of requests ``first:last`` of the batch, with as many new tokens each, and their
    ``context`` (tokens each had fed the model before this step)."""

    begin: int
    end: int
    first: int
    last: int
    context: torch.Tensor

    @property
    def rows(self) -> int:
        return self.last - self.first

    def rows_of(self, flat: torch.Tensor) -> torch.Tensor:
        """``[rows, tokens, ...]``: this segment's part of a flat-run tensor ``[1, N, ...]``."""
        return flat[0, self.begin : self.end].reshape(self.rows, -1, flat.shape[-1])


@dataclass(frozen=True)
class ServedBatch:
    """What the linear layers of one forward share: its segments and a cache that carries one layer's state into
    linspec's attention module for one segment at a time."""

    segments: list[Segment]
    cache: LinspecCache


class LinspecStateLayer(nn.Module, MambaBase):
    """One linear layer as vLLM sees it: declared state shapes and dtypes and the pages vLLM binds to it
    (``kv_cache``: one tensor per state field, ``[slots, *shape]``). During a forward it takes the place of the
    layer's ``LinspecAttention`` in the decoder layer and runs it segment by segment on the requests' states."""

    def __init__(self, attention: nn.Module, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self._attention = (attention,)  # in a tuple: the layer's weights belong to the causal LM, not here
        self.prefix = prefix
        dtype = compute_dtype(vllm_config.model_config.dtype)
        self._shapes, self._dtypes = state_layout(attention, dtype)
        self.kv_cache: tuple[torch.Tensor, ...] = ()
        self.heads: PagedHeadsTerm | None = None
        forward_context = vllm_config.compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"duplicate layer name {prefix}")
        forward_context[prefix] = self

    @property
    def attention(self) -> nn.Module:
        return self._attention[0]

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # LINEAR's metadata (slots, query starts, context lengths, decodes first) is all the model needs
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return self._dtypes

    def page_softmax_heads(self, vllm_config: VllmConfig, prefix: str) -> PagedHeadsTerm | None:
        """Put the layer's softmax heads (if it keeps any) on vLLM's paged attention; the new term comes back."""
        attention = self.attention
        term = next((t for t in attention.terms if isinstance(t, SoftmaxHeadsTerm)), None)
        if term is None:
            return None
        self.heads = PagedHeadsTerm(term, vllm_config, attention.head_dim, prefix)
        attention.terms = tuple(self.heads if t is term else t for t in attention.terms)
        return self.heads

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        linspec_batch: ServedBatch,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """The layer's attention output for the flat run ``[1, N, hidden]``: the softmax heads over the whole run
        at once, then linspec's layer on each segment; tokens in no segment (padding) get zeros."""
        attention = self.attention
        if self.heads is not None:
            q, k, v, _ = attention.project(hidden_states, position_embeddings)
            self.heads.attend(q, k, v)
        out = torch.zeros_like(hidden_states)
        cache = linspec_batch.cache
        # each kv-cache group of state layers has its own block table, so each layer its own slots
        slots = get_forward_context().attn_metadata[self.prefix].state_indices_tensor
        for segment in linspec_batch.segments:
            rows_slots = slots[segment.first : segment.last]
            state = read_states(attention, self.kv_cache, rows_slots, segment.context)
            cache.set_linear_state(attention.layer_idx, state)
            if self.heads is not None:
                self.heads.select(segment.begin, segment.end, segment.rows)
            result, _ = attention(
                segment.rows_of(hidden_states),
                position_embeddings=tuple(segment.rows_of(t) for t in position_embeddings),
                linspec_context=ExecutionContext(),
                **hf.cache_kwargs(cache),
            )
            write_states(cache.linear_state(attention.layer_idx), self.kv_cache, rows_slots)
            out[0, segment.begin : segment.end] = result.reshape(segment.end - segment.begin, -1)
        return out, None


@contextlib.contextmanager
def _standing_in(layer: nn.Module, attention: nn.Module) -> Iterator[None]:
    """``attention`` in place of a decoder layer's attention module, for the duration of one call."""
    original = hf.attention_of(layer)
    hf.set_attention(layer, attention)
    try:
        yield
    finally:
        hf.set_attention(layer, original)


class _LinspecCausalLM(nn.Module, HasInnerState):
    """What both served kinds share; see the module docstring."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        # this rank's part (a copy: the softmax layers' attention is routed through it, vLLM's reading stays)
        self.tensor_parallel = vllm_config.parallel_config.tensor_parallel_size
        self.rank = get_tensor_model_parallel_rank() if self.tensor_parallel > 1 else 0
        config = rank_config(vllm_config.model_config.hf_config, self.tensor_parallel, self.rank)
        if keeps_softmax(config) != bool(getattr(self, "is_hybrid", False)):
            raise ValueError(f"{type(self).__name__} does not serve this linspec model (softmax parts: "
                             f"{keeps_softmax(config)}); register linspec's vLLM plugin")  # fmt: skip
        _, model_class = linspec_classes_of(config)
        self.config = config
        self.dtype = vllm_config.model_config.dtype
        self.hf_model = model_class(config).to(self.dtype).eval()
        if self.tensor_parallel > 1:
            reduce_row_parallel_outputs(self.hf_model, tensor_model_parallel_all_reduce)
        self.parts = hf.DecoderParts(self.hf_model)
        base = f"{prefix}." if prefix else ""
        linear = linear_attentions(self.hf_model)
        if not linear:
            raise ValueError("this linspec model keeps every layer softmax; serve the original model instead")
        self.state_layers = nn.ModuleDict(
            {
                str(i): LinspecStateLayer(a, vllm_config, f"{base}model.layers.{i}.linspec_state")
                for i, a in linear.items()
            }
        )
        layers = hf.decoder_layers(self.hf_model)
        softmax = {i: hf.attention_of(layer) for i, layer in enumerate(layers) if i not in linear}
        self.softmax_attention = nn.ModuleDict(
            {str(i): a for i, a in route_softmax_layers(config, softmax, vllm_config, base).items()} if softmax else {}
        )
        heads = {
            index: layer.page_softmax_heads(vllm_config, f"{base}model.layers.{index}.self_attn.heads_attn")
            for index, layer in self.state_layers.items()
        }
        self.heads_attention = nn.ModuleDict({i: term.attention for i, term in heads.items() if term is not None})

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.parts.embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[tokens, hidden]`` of the scheduled batch (decodes, then each prefill)."""
        if input_ids is None:
            raise ValueError("linspec models take token ids, not input embeddings")
        metadata = self._metadata()
        if metadata is None:  # vLLM's warm-up and profiling runs: no requests, no state
            return torch.zeros(input_ids.shape[0], self.parts.hidden_size, dtype=self.dtype, device=input_ids.device)
        batch = ServedBatch(self._segments(metadata), self.hf_model.new_cache())
        positions = positions[None]
        hidden = self.parts.embed(input_ids[None])
        rotary = self.parts.rotary(hidden, positions)
        state_layers = {int(index): layer for index, layer in self.state_layers.items()}
        for index, layer in enumerate(hf.decoder_layers(self.hf_model)):
            state_layer = state_layers.get(index)
            with _standing_in(layer, state_layer) if state_layer is not None else contextlib.nullcontext():
                hidden = self.parts.run_layer(
                    index,
                    hidden,
                    attention_mask=None,
                    rotary=rotary,
                    positions=positions,
                    cache=None,
                    extra={"linspec_batch": batch},
                )
        return self.parts.final_norm(hidden)[0]

    def _metadata(self):
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata:
            return None
        return attn_metadata.get(next(iter(self.state_layers.values())).prefix)

    def _segments(self, metadata) -> list[Segment]:
        """The batch's runs for linear layers: all decodes together, then each prefill (chunk) alone."""
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        device = metadata.query_start_loc.device
        decodes = metadata.num_decodes
        groups = ([(0, decodes)] if decodes else []) + [(r, r + 1) for r in range(decodes, len(seq_lens))]
        segments = []
        for first, last in groups:
            begin, end = starts[first], starts[last]
            if begin == end:
                continue
            context = [seq_lens[r] - (starts[r + 1] - starts[r]) for r in range(first, last)]
            segments.append(Segment(begin, end, first, last, torch.tensor(context, device=device)))
        return segments

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.parts.head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The saved directory's tensors, under the Hugging Face class's own names (``global_scale``,
        ``conv_weight``, ``decay_logit`` included), each cut to this rank's part; a tied head comes with the
        embedding."""
        shapes = {name: tensor.shape for name, tensor in self.hf_model.state_dict().items()}
        tensors = {
            name: shard(name, tensor, shapes[name], self.tensor_parallel, self.rank) if name in shapes else tensor
            for name, tensor in weights
        }
        result = self.hf_model.load_state_dict(tensors, strict=False)
        tied = {name for name in result.missing_keys if name == "lm_head.weight" and self.config.tie_word_embeddings}
        missing = sorted(set(result.missing_keys) - tied)
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the checkpoint does not fit {type(self.hf_model).__name__}: missing {missing[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        return {f"hf_model.{name}" for name, _ in self.hf_model.named_parameters()}


class LinspecForCausalLM(_LinspecCausalLM, IsAttentionFree):
    """A converted linspec model whose layers are all linear: attention-free for vLLM, state pages only."""


class LinspecHybridForCausalLM(_LinspecCausalLM, IsHybrid):
    """A hybrid linspec model (softmax layers or softmax heads): state pages for the linear layers, paged KV for
    the softmax parts. vLLM sizes its attention blocks so that one holds a state page (the classmethods)."""

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        return _rank_state_layout(vllm_config)[0]

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return _rank_state_layout(vllm_config)[1]


def _rank_state_layout(vllm_config: VllmConfig):
    """One rank's state layout (every rank holds the same shapes: the kv heads split evenly)."""
    model_config = vllm_config.model_config
    config = rank_config(model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size, 0)
    return config_state_layout(config, model_config.dtype)
