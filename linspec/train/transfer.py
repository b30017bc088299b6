"""Attention transfer (stage 1): every linear layer learns to reproduce its frozen softmax parent's output.

Forward hooks on each ``LinspecAttention`` compute, from the same input, the output the original softmax
attention would have produced (``linspec.models.softmax_parent``: the module keeps the pretrained q/k/v/o, so
nothing is copied), record the layer's loss, and pass the *softmax* output on. So every layer sees exactly the
hidden states of the original model, layers train independently ("layer by layer") in one forward pass, and the
residual stream carries no gradient: backward only runs through each layer's own linear path.
"""

from __future__ import annotations

import contextlib

import torch

from linspec.models.attention import LinspecAttention
from linspec.models.softmax_parent import softmax_output_of_call


class AttentionTransfer:
    """Context manager: while active, linear layers record ``mean_t ||y_lin − y_soft||² / mean ||y_soft||²``
    (a relative MSE, so every layer weighs the same) and forward the softmax output. ``loss()`` averages them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, LinspecAttention)]
        self.losses: list[torch.Tensor] = []
        self.handles = []
        self._layer_sums = torch.zeros(len(self.modules), dtype=torch.float64)
        self._layer_counts = 0

    def _hook(self, module, args, kwargs, output):
        with torch.no_grad():
            target = softmax_output_of_call(module, args, kwargs).float()
        linear = output[0].float()
        self.losses.append((linear - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))
        return (target.to(output[0].dtype), *output[1:])

    def __enter__(self) -> AttentionTransfer:
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @contextlib.contextmanager
    def paused(self):
        """Hooks off for the duration: evaluating mid-stage must measure the linear model, not the softmax
        outputs the hooks pass on."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()

    def loss(self) -> torch.Tensor:
        """Mean over layers of the losses recorded since the last call; clears them."""
        if not self.losses:
            raise RuntimeError("attention transfer recorded no layer: is the model a linspec model?")
        stacked = torch.stack(self.losses)
        self._layer_sums += stacked.detach().double().cpu()
        self._layer_counts += 1
        self.losses = []
        return stacked.mean()

    def take_layer_losses(self) -> list[float]:
        """Each layer's mean loss over the ``loss()`` calls since the last take: the per-layer view that says
        which layers linearise badly (candidates for ``conversion.softmax_layers``)."""
        means = (self._layer_sums / max(1, self._layer_counts)).tolist()
        self._layer_sums.zero_()
        self._layer_counts = 0
        return means
