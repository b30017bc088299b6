"""The vLLM model class of every linspec architecture: linspec's own layers, with each linear layer's decode state
kept by vLLM as constant-size state per request.

vLLM schedules a batch of requests as one flat run of tokens: decodes (one token each) first, then prefills or
prefill chunks, each continuing from whatever its request has fed the model so far. This class runs the linspec
causal LM (the Hugging Face class, weights from the saved directory) layer by layer through ``hf.DecoderParts``,
the same driver speculative decoding uses: all decodes as one batch in linspec's recurrent step, then each prefill
in linspec's extend mode on its request's state. Before a segment each layer's state rows are read from vLLM's
pages (``linspec.serving.state``) and after it written back, so vLLM owns the memory, the slots and their reuse.

Each linear layer is represented to vLLM by a ``LinspecStateLayer`` (vLLM's ``MambaBase``): it declares the
state's shapes and dtypes, receives the pages vLLM allocates, and is how the engine finds the per-request slots
(``LinearAttentionMetadata``). The model is attention-free for vLLM: hybrids (softmax layers or heads, whose
KV grows) are refused for now.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from linspec.models import hf
from linspec.models.context import ExecutionContext
from linspec.models.modeling import linspec_classes_of
from linspec.serving.state import compute_dtype, read_states, state_layout, write_states


class LinspecStateLayer(nn.Module, MambaBase):
    """One linear layer's state as vLLM sees it: declared shapes and dtypes, and the pages vLLM binds to it
    (``kv_cache``: one tensor per state field, ``[slots, *shape]``). It computes nothing; the model reads and
    writes the pages around each run of linspec's layer."""

    def __init__(self, attention: nn.Module, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self._attention = (attention,)  # in a tuple: the layer's weights belong to the causal LM, not here
        self.prefix = prefix
        dtype = compute_dtype(vllm_config.model_config.dtype)
        self._shapes, self._dtypes = state_layout(attention, dtype)
        self.kv_cache: tuple[torch.Tensor, ...] = ()
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


class LinspecForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    """A converted linspec model (all layers linear) served by vLLM; see the module docstring."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        settings = config.linspec_settings
        if settings.softmax_layers or settings.softmax_heads:
            raise ValueError(
                "linspec's vLLM plugin serves models whose layers are all linear; this one keeps softmax layers or "
                "heads (their growing KV cache is not wired to vLLM's paged attention yet)"
            )
        _, model_class = linspec_classes_of(config)
        self.config = config
        self.dtype = vllm_config.model_config.dtype
        self.hf_model = model_class(config).to(self.dtype).eval()
        self.parts = hf.DecoderParts(self.hf_model)
        attentions = [hf.attention_of(layer) for layer in hf.decoder_layers(self.hf_model)]
        base = f"{prefix}." if prefix else ""
        self.state_layers = nn.ModuleList(
            LinspecStateLayer(attention, vllm_config, f"{base}model.layers.{index}.linspec_state")
            for index, attention in enumerate(attentions)
        )

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
        out = torch.zeros(input_ids.shape[0], self.parts.hidden_size, dtype=self.dtype, device=input_ids.device)
        metadata = self._metadata()
        if metadata is None:  # vLLM's warm-up and profiling runs: no requests, no state
            return out
        starts = metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens.tolist()
        slots = metadata.state_indices_tensor
        decodes = metadata.num_decodes
        segments = ([(0, decodes)] if decodes else []) + [(r, r + 1) for r in range(decodes, len(seq_lens))]
        for first, last in segments:
            begin, end = starts[first], starts[last]
            if begin == end:
                continue
            rows = last - first
            ids = input_ids[begin:end].view(rows, -1)
            pos = positions[begin:end].view(rows, -1)
            context = torch.tensor(
                [seq_lens[r] - (starts[r + 1] - starts[r]) for r in range(first, last)], device=ids.device
            )
            out[begin:end] = self._run(ids, pos, slots[first:last], context).reshape(end - begin, -1)
        return out

    def _metadata(self):
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata:
            return None
        return attn_metadata.get(self.state_layers[0].prefix)

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Rows of requests, each with its own state (slot) and context length, through every layer."""
        cache = self.hf_model.new_cache()
        for index, layer in enumerate(self.state_layers):
            cache.set_linear_state(index, read_states(layer.attention, layer.kv_cache, slots, context))
        hidden = self.parts.embed(ids)
        rotary = self.parts.rotary(hidden, pos)
        for index in range(self.parts.num_layers):
            hidden = self.parts.run_layer(
                index,
                hidden,
                attention_mask=None,
                rotary=rotary,
                positions=pos,
                cache=cache,
                extra={"linspec_context": ExecutionContext()},
            )
        for index, layer in enumerate(self.state_layers):
            write_states(cache.linear_state(index), layer.kv_cache, slots)
        return self.parts.final_norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.parts.head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The saved directory's tensors, under the Hugging Face class's own names (``global_scale``,
        ``conv_weight``, ``decay_logit`` included); a tied head comes with the embedding."""
        tensors = dict(weights)
        result = self.hf_model.load_state_dict(tensors, strict=False)
        tied = {name for name in result.missing_keys if name == "lm_head.weight" and self.config.tie_word_embeddings}
        missing = sorted(set(result.missing_keys) - tied)
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the checkpoint does not fit {type(self.hf_model).__name__}: missing {missing[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        return {f"hf_model.{name}" for name, _ in self.hf_model.named_parameters()}
