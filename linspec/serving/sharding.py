"""Tensor parallelism over kv heads: what one rank of a linspec model holds, and how it gets it.

Rank ``r`` of ``T`` owns kv heads ``[r·Hkv/T, (r+1)·Hkv/T)`` and the query heads that read them, as vLLM's own
Llama splits its ``QKVParallelLinear``: q/k/v projections by output rows, ``o_proj`` by input columns (row-parallel,
its partial outputs summed over ranks), and the MLP likewise (gate/up by rows, down by columns). A rank's model is
the linspec model of a config with ``Hkv/T`` kv heads, ``H/T`` query heads and ``I/T`` MLP channels
(``rank_config``), so every per-head parameter (``conv_weight``, ``decay_logit``, ``memory_bias``, the far memory's
maps) and every state tensor (window ring, sinks, global memory, far memory, conv ring) is built at its rank's size
by linspec itself: no state tensor mixes kv heads, so the ranks never exchange state. Loading slices each saved
tensor along the one axis where the rank's parameter is ``T`` times smaller (``shard``); row-parallel biases are
added once, on rank 0. Embeddings, norms and the head are replicated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Modules whose input is split over ranks: each rank's output is a partial sum, all-reduced after the module.
ROW_PARALLEL = ("o_proj", "down_proj")


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def parallel_refusal(config, tensor_parallel: int, pipeline_parallel: int) -> str | None:
    """One line saying why a linspec model with ``config`` cannot run at these parallel sizes, or None."""
    if pipeline_parallel > 1:
        return "linspec's vLLM plugin does not run pipeline parallelism; serve with --pipeline-parallel-size 1"
    if tensor_parallel == 1:
        return None
    kv_heads = config.num_key_value_heads
    if kv_heads % tensor_parallel:
        return (
            f"linspec's vLLM plugin splits kv heads over tensor-parallel ranks: this model's {kv_heads} kv heads do "
            f"not divide by --tensor-parallel-size {tensor_parallel}; serve with a size that divides {kv_heads}"
        )
    if config.intermediate_size % tensor_parallel:
        return (
            f"the MLP's {config.intermediate_size} channels do not divide by --tensor-parallel-size "
            f"{tensor_parallel}; serve with a size that divides both the kv heads and the MLP channels"
        )
    per_rank = kv_heads // tensor_parallel
    settings = config.linspec_settings
    for layer in sorted({at for at, _ in settings.softmax_heads}):
        counts = [sum(1 for head in settings.heads_of(layer) if head // per_rank == r) for r in range(tensor_parallel)]
        if len(set(counts)) > 1:
            return (
                f"layer {layer} keeps softmax kv heads {list(settings.heads_of(layer))}, which do not spread evenly "
                f"over {tensor_parallel} tensor-parallel ranks of {per_rank} kv heads each; serve with a "
                "tensor-parallel size that gives every rank as many of them"
            )
    return None


def rank_config(config, tensor_parallel: int, rank: int):
    """A copy of a linspec model's ``config`` describing rank ``rank``'s part: its heads, MLP channels and, renumbered
    from 0, the softmax heads among its kv heads (the head size stays the whole model's)."""
    config = copy.deepcopy(config)
    if tensor_parallel == 1:
        return config
    per_rank = config.num_key_value_heads // tensor_parallel
    config.head_dim = head_dim_of(config)
    config.num_attention_heads //= tensor_parallel
    config.num_key_value_heads = per_rank
    config.intermediate_size //= tensor_parallel
    heads = config.linspec_settings.softmax_heads
    local = [[layer, head - rank * per_rank] for layer, head in heads if head // per_rank == rank]
    config.linspec = {**config.linspec, "softmax_heads": local}
    return config


def shard(name: str, full: torch.Tensor, local_shape: torch.Size, tensor_parallel: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of the saved tensor ``name``: the whole tensor where the rank's parameter has its shape
    (a row-parallel bias only on rank 0, zeros elsewhere, so the all-reduce adds it once), else the rank's slice of
    the one axis where the parameter is ``tensor_parallel`` times smaller."""
    if full.shape == local_shape:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if rank > 0 and name.endswith(".bias") and module in ROW_PARALLEL:
            return torch.zeros_like(full)
        return full
    split = []
    if full.dim() == len(local_shape):
        split = [axis for axis, (whole, part) in enumerate(zip(full.shape, local_shape, strict=True)) if whole != part]
    if len(split) != 1 or full.shape[split[0]] != local_shape[split[0]] * tensor_parallel:
        raise ValueError(
            f"{name}: saved shape {tuple(full.shape)} does not split into {tensor_parallel} ranks of "
            f"{tuple(local_shape)}"
        )
    return full.chunk(tensor_parallel, dim=split[0])[rank]


def reduce_row_parallel_outputs(model: nn.Module, all_reduce) -> None:
    """Sum the partial outputs of every row-parallel module of ``model`` over the ranks (``all_reduce``), right after
    the module, where vLLM's ``RowParallelLinear`` does."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ROW_PARALLEL:
            module.register_forward_hook(lambda _module, _inputs, output: all_reduce(output))
