"""Which drafted tokens the target accepts, and the token it adds after them — exact for greedy and sampling.

Greedy: walk down from the root while some child carries the target's argmax; the output equals plain greedy
decoding. Sampling (Leviathan et al. 2023; Chen et al. 2023; siblings in turn as in SpecInfer's multi-step
speculative sampling): at a node with target distribution p, test its children one by one — child x drawn from
q is accepted with probability min(1, p(x)/q(x)); after a rejection p becomes norm(max(0, p − q)) and the next
sibling is tested against that residual. If a child is accepted the walk moves to it (fresh p); if none is, the
token is drawn from what remains of p — over the whole vocabulary. A fully accepted path ends with a bonus token
drawn from p at its last node. Every step is an exact rejection sampler, so the emitted tokens follow p.
"""

from __future__ import annotations

import torch

from linspec.speculative.sampling import SamplingConfig, normalize, sample
from linspec.speculative.tree import children_table


def accept(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    valid: torch.Tensor,
    q: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept along one path of the verification tree ``[root; nodes]`` (node 0 is the root).

    ``logits [B, N, V]``: the target's logits at every node; ``q [B, N, V]`` (row 0 unused) the distribution each
    node was drawn from, or None for point masses. Returns ``(path [B, D], path_mask [B, D], next_token [B])``:
    the accepted nodes from the root down (``path_mask`` is a prefix mask) and the token that follows them.
    """
    batch = logits.shape[0]
    rows = torch.arange(batch, device=logits.device)
    children = children_table(parents, valid)  # (B, N, K)
    greedy = sampling.greedy
    # Greedy needs only the target's token at each node: one argmax over all nodes, no distributions.
    target_token = logits.argmax(-1) if greedy else None  # (B, N)

    def target_dist(at: torch.Tensor) -> torch.Tensor:
        return sampling.probs(logits[rows, at])  # (B, V)

    current = torch.zeros(batch, dtype=torch.long, device=logits.device)
    p = None if greedy else target_dist(current)
    searching = torch.ones(batch, dtype=torch.bool, device=logits.device)
    path, path_mask = [current], [searching]
    for _ in range(tokens.shape[1] - 1):
        moved = torch.zeros_like(searching)
        best = target_token[rows, current] if greedy else None
        for slot in range(children.shape[2]):
            child = children[rows, current, slot]
            trying = searching & ~moved & (child >= 0)
            if not bool(trying.any()):
                break
            child = child.clamp(min=0)
            x = tokens[rows, child]
            if greedy:
                ok = trying & (x == best)
            else:
                # Accept x ~ q with probability min(1, p(x)/q(x)); on rejection continue with the residual
                # norm(max(0, p − q)) — testing the next sibling against it, or sampling from it at the end.
                # Point-mass drafts (q = δ_x) accept with p(x) and leave p with x removed.
                p_x = p.gather(1, x[:, None])[:, 0]
                if q is None:
                    q_x, residual = torch.ones_like(p_x), p.scatter(1, x[:, None], 0.0)
                else:
                    q_child = q[rows, child]
                    q_x, residual = q_child.gather(1, x[:, None])[:, 0], (p - q_child).clamp(min=0)
                u = torch.rand(batch, generator=generator, device=p.device)
                ok = trying & (u * q_x < p_x)
                residual_ok = residual.sum(-1, keepdim=True) > 0
                p = torch.where((trying & ~ok)[:, None] & residual_ok, normalize(residual), p)
            moved = moved | ok
            current = torch.where(ok, child, current)
        searching = searching & moved
        if not bool(searching.any()):
            break
        if not greedy:
            p = torch.where(moved[:, None], target_dist(current), p)
        path.append(current)
        path_mask.append(searching)
    next_token = target_token[rows, current] if greedy else sample(p, generator)
    return torch.stack(path, 1), torch.stack(path_mask, 1), next_token
