"""Held-out perplexity during training: ``linspec.evaluate``'s scoring, split over the processes of a run."""

from __future__ import annotations

import math
import time

import torch

from linspec.evaluate import sequence_nll
from linspec.train.distributed import DTYPES, Env
from linspec.train.recipe import Stage


@torch.no_grad()
def evaluate(
    forward, sequences: torch.Tensor, env: Env, precision: str, first_stage: Stage
) -> tuple[float, int, float]:
    """``(perplexity, tokens scored, seconds)`` over packed ``sequences [M, L]``. Each process scores its share
    (the same number each, so collectives stay in step) in micro batches of the first stage; the sums are added
    over processes. ``forward`` may be a DDP/FSDP wrapper; its train/eval mode is restored afterwards."""
    was_training = forward.training
    forward.eval()
    share = sequences[env.rank :: env.world][: len(sequences) // env.world]
    autocast = torch.autocast(env.device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    start = time.perf_counter()
    total, count = 0.0, 0
    for batch in share.split(max(1, first_stage.micro_batch_size)):
        with autocast:
            nll, n = sequence_nll(forward, batch.to(env.device))
        total, count = total + nll, count + n
    total, count = env.sum([total, count])
    forward.train(was_training)
    return math.exp(total / count), int(count), time.perf_counter() - start
