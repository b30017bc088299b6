"""The global term's memory: the paper's plain sum over complete groups, or a decayed and/or normalised one.

With ``ΔS_g = Σ_{s in group g} k̂_s v_sᵀ`` and ``g = grp(t)`` complete groups before token ``t``::

    S_0 = 0,   S_{g+1} = λ_h S_g + ΔS_g               (λ_h = 1 without decay: the paper's exclusive cumsum)
    global_t = q̂_tᵀ S_g / den_t
    den_t = 1                                          norm "none" (the paper)
          = n_g + eps,   n_g = G Σ_{j<g} λ_h^j          norm "mean": a decay-weighted mean over folded tokens
          = q̂_tᵀ z_g + eps,  z_{g+1} = λ_h z_g + Σ k̂   norm "key": the classic linear-attention denominator

The paper's S grows with every group, so past the training length it swamps the layer; both options bound it.
Decay is per *kv* head (the state is stored per kv head, so a per-query-head λ would need H copies of S) and acts
once per folded group, so its recurrent form is one scalar multiply per fold. ``n_g`` needs no state: every
complete group holds exactly G real tokens, so it follows from the group index. ``z`` is kept in the state.

Every mode reaches S through ``fold`` (one group) or ``scan_groups`` (many), and divides through ``normalise``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linspec.config import GLOBAL_NORMS


@dataclass(frozen=True)
class GlobalMemory:
    """How S is kept. ``GlobalMemory()`` (or ``None`` wherever an op takes one) is the paper's plain sum."""

    log_decay: torch.Tensor | None = None  # (Hkv,) log λ_h < 0, or (B, Hkv): per row; None: no decay
    norm: str = "none"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.norm not in GLOBAL_NORMS:
            raise ValueError(f"norm must be one of {GLOBAL_NORMS}, got {self.norm!r}")

    @property
    def plain(self) -> bool:
        return self.log_decay is None and self.norm == "none"

    @property
    def keeps_key_sum(self) -> bool:
        """Whether the state must carry ``z`` (``LinearAttentionState.key_sum``)."""
        return self.norm == "key"


def is_plain(memory: GlobalMemory | None) -> bool:
    """True for the paper's memory, whose code paths stay exactly as they were."""
    return memory is None or memory.plain


def per_head(log_decay: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(Hkv,) -> (1, Hkv, 1, …)`` or ``(B, Hkv) -> (B, Hkv, 1, …)`` with ``ndim`` dims, to broadcast against
    ``[B, Hkv, …]`` tensors. Per-row decays let layers with different λ be stacked along the batch axis and
    appended in one call (the speculative commit)."""
    rows = log_decay.shape[0] if log_decay.dim() == 2 else 1
    return log_decay.view(rows, -1, *([1] * (ndim - 2)))


def decay_power(memory: GlobalMemory | None, steps: torch.Tensor) -> torch.Tensor | None:
    """``λ_h ** steps`` for ``steps [B, 1, …]`` (broadcast over heads) → ``[B, Hkv, …]``; None without decay."""
    if memory is None or memory.log_decay is None:
        return None
    return torch.exp(per_head(memory.log_decay, steps.dim()) * steps)


def fold(memory: GlobalMemory | None, total: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``λ_h · total + group`` for ``[B, Hkv, …]`` sums: one group folded into S (or into z)."""
    if memory is None or memory.log_decay is None:
        return total + group
    return torch.exp(per_head(memory.log_decay, total.dim())) * total + group


def scan_groups(
    memory: GlobalMemory | None, per_group: torch.Tensor, initial: torch.Tensor | None, dim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(before, through)`` over the group axis ``dim`` of ``per_group [B, Hkv, …, NG, …]``.

    ``through[g]`` is the memory after folding groups ``0..g`` onto ``initial`` (``[B, Hkv, …]``, the memory
    before group 0), ``before[g]`` the memory group ``g`` reads: ``fold`` applied NG times, as one product with
    the ``NG×NG`` matrix ``λ^(g−j)`` (``j ≤ g``) when there is decay, the paper's cumsum when there is not.
    """
    if memory is None or memory.log_decay is None:
        through = per_group.cumsum(dim=dim)
        if initial is not None:
            through = through + initial.unsqueeze(dim)
        return through - per_group, through
    num_groups = per_group.shape[dim]
    moved = per_group.movedim(dim, 2)  # (B, Hkv, NG, …)
    index = torch.arange(num_groups, device=per_group.device)
    lag = (index[:, None] - index[None, :]).to(memory.log_decay.dtype)  # (NG, NG): g − j
    log_weights = per_head(memory.log_decay, 4) * lag  # (1 or B, Hkv, NG, NG)
    weights = torch.exp(torch.where(lag >= 0, log_weights, float("-inf"))).to(per_group.dtype)
    flat = moved.reshape(*moved.shape[:3], -1)  # (B, Hkv, NG, M)
    through = (weights @ flat).view(moved.shape)
    if initial is not None:
        carry = torch.exp(per_head(memory.log_decay, 3) * (index + 1)).to(per_group.dtype)  # λ^(g+1), (1|B, Hkv, NG)
        through = through + carry.view(*carry.shape, *([1] * (moved.dim() - 3))) * initial.unsqueeze(2)
    start = initial.unsqueeze(2) if initial is not None else torch.zeros_like(moved[:, :, :1])
    before = torch.cat([start, through[:, :, :-1]], dim=2)
    return before.movedim(2, dim), through.movedim(2, dim)


def folded_count(memory: GlobalMemory, groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """``n_g = G Σ_{j<g} λ^j`` for group indices ``groups [B, 1, …]`` → ``[B, Hkv or 1, …]``.

    Closed form ``G (1 − λ^g) / (1 − λ)`` through ``expm1``, accurate for λ close to 1; no state needed.
    """
    groups = groups.to(torch.float64 if memory.log_decay is None else memory.log_decay.dtype)
    if memory.log_decay is None:
        return group_size * groups
    log_decay = per_head(memory.log_decay.clamp(max=-1e-20), groups.dim())  # λ = 1 exactly would be 0/0
    return group_size * torch.expm1(groups * log_decay) / torch.expm1(log_decay)


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """``[…, D] -> […, D + 1]``: a ones column, so a product that sums ``k̂ vᵀ`` also sums ``k̂`` (z) alongside."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def augmented(memory: GlobalMemory | None, values: torch.Tensor, key_sum: torch.Tensor | None = None) -> torch.Tensor:
    """What the global term reads: ``values`` (a value matrix or S), with its ``z`` column for norm "key".

    ``key_sum`` given: ``values`` is an S-like ``[…, Dk, Dv]`` and its ``z`` (``[…, Dk]``) is appended;
    otherwise ``values`` are value rows and the column is ones.
    """
    if memory is None or not memory.keeps_key_sum:
        return values
    if key_sum is None:
        return with_ones(values)
    return torch.cat([values, key_sum.unsqueeze(-1).to(values.dtype)], dim=-1)


def normalise(
    memory: GlobalMemory | None, readout: torch.Tensor, groups: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The global term from ``readout = q̂ᵀ augmented(S)`` (``[B, Hkv, …, Dv (+1)]``), divided by its ``den``.

    ``groups [B, 1, …]`` (readout's dims but the last, heads broadcast) holds each query's complete-group count.
    """
    if memory is None or memory.norm == "none":
        return readout
    if memory.norm == "key":
        return readout[..., :-1] / (readout[..., -1:] + memory.eps)
    count = folded_count(memory, groups, group_size).to(readout.dtype)
    return readout / (count.unsqueeze(-1) + memory.eps)
