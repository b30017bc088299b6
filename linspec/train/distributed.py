"""Processes and devices: the run's ``Env`` (rank, world, device), DDP/FSDP2 wrapping, and gathering shards.

Distributed runs are started with ``torchrun`` (or ``accelerate launch``, which sets the same variables): every
process reads the same global batch and takes its slice; DDP averages gradients, FSDP2 shards the model.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from linspec.errors import LinspecError
from linspec.train.recipe import Recipe, Stage

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64, so token counts stay exact)."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def mean(self, value: float) -> float:
        return self.sum([value])[0] / self.world

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor)


def setup_env(recipe: Recipe) -> Env:
    use_cuda = recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise LinspecError("recipe key device: cuda requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    return Env(rank, world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def wrap(model, recipe: Recipe, env: Env, stage: Stage):
    """The module to call forward on: the model itself, DDP around it, or FSDP2 sharding it in place.

    Attention transfer is replicated (DDP) even under ``distributed: fsdp``. Its losses leave each layer through
    hooks, not through the layer outputs, so no gradient ever reaches an output FSDP2 hooks: its post-backward
    (the reduce-scatter into the sharded gradients) would never run and the optimiser would see no gradient for
    sharded weights. DDP's hooks sit on the parameters instead. The stage needs every layer whole for its
    softmax targets anyway and trains only small tensors (γ, conv, LoRA), so sharding would save little.
    """
    if env.world == 1:
        return model
    if recipe.distributed == "fsdp" and stage.kind != "attention_transfer":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from linspec.models import hf

        policy = MixedPrecisionPolicy(param_dtype=DTYPES[recipe.precision], reduce_dtype=torch.float32)
        # FSDP2 cannot shard 0-d tensors (γ): they stay replicated and their gradients are averaged by hand.
        scalars = {p for p in model.parameters() if p.dim() == 0}
        for layer in hf.decoder_layers(model):
            fully_shard(layer, mp_policy=policy, ignored_params=scalars)
        fully_shard(model, mp_policy=policy, ignored_params=scalars)
        model.linspec_replicated = [p for p in scalars if p.requires_grad]
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def is_sharded(model) -> bool:
    """Whether ``fully_shard`` was applied. Not read off the parameters: FSDP2's root module keeps its weights
    gathered after forward (embeddings, final norm, head), so they read as plain tensors until resharded."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor as an ordinary CPU tensor; a collective when it is sharded.

    ``full_tensor()`` may hand back an ``AsyncCollectiveTensor`` whose storage is not a real one (safetensors
    fails on it), so it is waited on first, as torch's own full-state-dict gathering does.
    """
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
        if isinstance(tensor, AsyncCollectiveTensor):
            tensor = tensor.wait()
    return tensor.detach().cpu()


def unshard(model):
    """A plain copy of an FSDP2-sharded model (its peft wrapping included), whole on the CPU of every process.

    ``fully_shard`` works in place (DTensor parameters, swapped module classes) and has no inverse, while
    ``merge_and_unload``, ``save_pretrained`` and the next stage's own sharding need ordinary tensors. So the same
    structure is built on the meta device (no init cost, like ``convert``) and the gathered weights are assigned
    to it. Weights are gathered one tensor at a time, so a GPU holds at most one extra whole tensor; buffers are
    never sharded and are taken over as they are, which covers non-persistent ones (RoPE's ``inv_freq``) that no
    state dict carries.
    """
    from torch.distributed.fsdp import FSDPModule

    from linspec.conversion.convert import _set_tensor

    weights = {name: gathered(tensor) for name, tensor in model.state_dict().items()}
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    model_class = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = model_class(base.config)
    plain_base = plain
    if peft_config:
        from peft import get_peft_model

        if list(peft_config) != ["default"]:
            raise LinspecError(f"cannot gather a sharded model with adapters {list(peft_config)}; expected one")
        plain = get_peft_model(plain_base, copy.deepcopy(peft_config["default"]))
    result = plain.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise LinspecError(
            f"gathering the sharded model: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}"
        )
    for name, buffer in model.named_buffers():
        _set_tensor(plain, name, buffer.detach().cpu())
    plain_base.tie_weights()  # assign=True gave tied weights (embeddings, lm_head) two separate tensors
    plain_base.generation_config = base.generation_config
    leftover = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if leftover:
        raise LinspecError(f"gathering the sharded model left uninitialised tensors: {leftover[:4]}")
    return plain.train(model.training)
