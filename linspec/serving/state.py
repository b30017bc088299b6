"""A linear layer's decode state as vLLM holds it: a fixed set of tensors per request slot.

vLLM gives every layer with constant-size state one page per request and views it as tensors of declared shapes
and dtypes (``MambaBase.get_state_shape``/``get_state_dtype``), indexed by the request's slot. A linspec layer's
state (``LayerState``: ``position`` and each term's slice) maps onto such pages field by field, in the order
``LayerState.tensors()`` lists them, without ``position``: vLLM already knows how many tokens each request has
fed the layer (its context length), so the position is taken from there rather than stored twice.
"""

from __future__ import annotations

import copy

import torch

from linspec.models import hf
from linspec.models.attention import LinspecAttention
from linspec.models.modeling import linspec_classes_of
from linspec.models.terms.base import LayerState

# (shapes, dtypes) of one request's state tensors in one layer, in the order the pages hold them
StateLayout = tuple[tuple[tuple[int, ...], ...], tuple[torch.dtype, ...]]


def compute_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a linspec layer keeps its state in: float32 under 16-bit weights (running sums must not round at
    every token, ``LinspecAttention.project``), otherwise the weights' own dtype."""
    return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype


def _state_tensors(state: LayerState) -> list[torch.Tensor]:
    return [tensor for name, tensor in state.tensors().items() if name != "position"]


def state_layout(attention, dtype: torch.dtype) -> StateLayout:
    """``(shapes, dtypes)`` of one request's state in layer ``attention`` (a ``LinspecAttention``), per tensor."""
    template = _state_tensors(attention.empty_state(1, dtype, torch.device("cpu")))
    return tuple(tuple(t.shape[1:]) for t in template), tuple(t.dtype for t in template)


def linear_attentions(model) -> dict[int, LinspecAttention]:
    """The linear layers' attention modules of a linspec causal LM, by decoder-layer index (softmax layers left
    out)."""
    attentions = (hf.attention_of(layer) for layer in hf.decoder_layers(model))
    return {index: a for index, a in enumerate(attentions) if isinstance(a, LinspecAttention)}


def config_state_layout(config, model_dtype: torch.dtype) -> StateLayout:
    """``(shapes, dtypes)`` of one request's state in any linear layer of a model with ``config``, from the config
    alone (vLLM sizes a hybrid's pages before it builds the model): the model is built on the meta device, where
    it allocates nothing. Every linear layer of a linspec model keeps the same state."""
    config = copy.deepcopy(config)  # the caller's (vLLM's) config stays as it was
    _, model_class = linspec_classes_of(config)
    with torch.device("meta"):
        model = model_class(config)
    layouts = {state_layout(a, compute_dtype(model_dtype)) for a in linear_attentions(model).values()}
    if len(layouts) != 1:
        raise ValueError(f"a linspec model's linear layers keep one state layout each alike, found {len(layouts)}")
    return layouts.pop()


def _run_start(slots: torch.Tensor) -> int | None:
    """The first slot when ``slots`` are one ascending run (``first, first + 1, ...``), else None."""
    first = int(slots[0])
    if slots.shape[0] == 1 or bool((slots == torch.arange(first, first + slots.shape[0], device=slots.device)).all()):
        return first
    return None


def _rows(page: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Page rows ``slots``: a view when they are one ascending run (always for one request), else a gathered copy."""
    first = _run_start(slots)
    return page.index_select(0, slots) if first is None else page[first : first + slots.shape[0]]


def read_states(attention, pages: tuple[torch.Tensor, ...], slots: torch.Tensor, positions: torch.Tensor) -> LayerState:
    """The ``LayerState`` of a batch of requests: row ``b`` from page slot ``slots[b]``, at ``positions[b]`` tokens
    seen; a row at position 0 is a new request and starts from the empty state, whatever its page held before.

    Every decode step reads each request's whole state (the window's keys and values of every layer), so the rows
    are views into the pages where the slots allow it, and the empty state is only made for batches with a new
    request."""
    slots = slots.long()
    stored = [_rows(page, slots) for page in pages]
    fresh = positions == 0
    if bool(fresh.any()):
        empties = _state_tensors(attention.empty_state(slots.shape[0], pages[0].dtype, pages[0].device))
        stored = [torch.where(fresh.view(-1, *[1] * (s.dim() - 1)), e, s) for s, e in zip(stored, empties, strict=True)]
    given = iter([positions.to(torch.long), *stored])
    state = attention.empty_state(0, pages[0].dtype, pages[0].device).map(lambda _: next(given))
    if next(given, None) is not None:
        raise RuntimeError("the state pages hold more tensors than this layer's state")
    return state


def write_states(state: LayerState, pages: tuple[torch.Tensor, ...], slots: torch.Tensor) -> None:
    """Store each row of ``state`` into its request's page slot ``slots[b]``. A tensor that is still the view
    ``read_states`` gave (a part the step left as it was, such as filled sinks) is in its page already."""
    tensors = _state_tensors(state)
    if len(tensors) != len(pages):
        raise RuntimeError(f"this layer's state has {len(tensors)} tensors, its pages {len(pages)}")
    slots = slots.long()
    first = _run_start(slots)
    for page, tensor in zip(pages, tensors, strict=True):
        if first is not None and tensor.data_ptr() == page[first].data_ptr() and tensor.stride() == page.stride():
            continue
        if tensor.untyped_storage().data_ptr() == page.untyped_storage().data_ptr():
            tensor = tensor.clone()  # another part of the page itself: never copy a page onto itself
        page.index_copy_(0, slots, tensor.to(page.dtype))
