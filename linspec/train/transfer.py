"""Attention transfer (stage 1): every linear layer learns to reproduce its frozen softmax parent's output.

Forward hooks on each ``LinspecAttention`` compute, from the same input, the output the original softmax
attention would have produced (``linspec.models.softmax_parent``: the module keeps the pretrained q/k/v/o, so
nothing is copied), record the layer's loss, and pass the *softmax* output on. So every layer sees exactly the
hidden states of the original model, layers train independently ("layer by layer") in one forward pass, and the
residual stream carries no gradient: backward only runs through each layer's own linear path.

Two losses per layer: the relative MSE of the layer's output (``mse``, every position, every parameter the stage
trains), and for a window with a far memory the KL divergence of its attention rows over the evicted tokens
(``far_attention``, ``linspec.train.far_attention``), which aims at exactly the mass the memory must carry and,
alone, reads nothing of the layer's own forward: with it alone, each layer runs only its parent's attention.
``output_mse_weight`` adds the MSE to the KL.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from linspec.errors import LinspecError
from linspec.models import hf
from linspec.models.attention import LinspecAttention
from linspec.models.softmax_parent import parent_projections, softmax_attention
from linspec.train.far_attention import far_attention_kl


class AttentionTransfer:
    """Context manager: while active, linear layers record their loss and forward the softmax output; ``loss()``
    averages them over layers. ``mse``: ``mean_t ||y_lin − y_soft||² / mean ||y_soft||²`` (a relative MSE, so every
    layer weighs the same). ``far_attention``: the far attention KL, plus ``output_mse_weight`` × the MSE."""

    def __init__(self, model: torch.nn.Module, loss: str = "mse", output_mse_weight: float = 0.0) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, LinspecAttention)]
        self.far_attention = loss == "far_attention"
        self.mse_weight = output_mse_weight if self.far_attention else 1.0
        self.losses: list[torch.Tensor] = []
        self.handles = []
        self._layer_sums = torch.zeros(len(self.modules), dtype=torch.float64)
        self._layer_counts = 0

    @property
    def needs_layer_outputs(self) -> bool:
        """Whether the loss reads the layers' own outputs (else they are not computed, and the forward keeps no
        graph)."""
        return self.mse_weight > 0

    def _hook(self, module, args, kwargs, output):
        hidden, positions = hf.attention_call_inputs(args, kwargs)
        return (self._record(module, hidden, positions, output[0]), *output[1:])

    def _parent_only(self, module: LinspecAttention, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """The layer's forward while the loss reads no layer output (the far attention KL alone): its own
        attention would be computed only to be replaced, so only the parent's runs."""
        hidden, positions = hf.attention_call_inputs(args, kwargs)
        return self._record(module, hidden, positions, None), None

    def _record(
        self,
        module: LinspecAttention,
        hidden: torch.Tensor,
        positions: tuple[torch.Tensor, torch.Tensor],
        linear: torch.Tensor | None,
    ) -> torch.Tensor:
        """Records the layer's loss (``linear``: its own output, read by the MSE) and returns the softmax output
        that the next layer reads."""
        with torch.no_grad():
            target = softmax_attention(module, hidden, positions).float()
        loss = None
        if self.far_attention:
            loss = far_attention_loss(module, hidden, positions)
        if self.mse_weight > 0:
            mse = (linear.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
            loss = self.mse_weight * mse if loss is None else loss + self.mse_weight * mse
        if loss is not None:
            self.losses.append(loss)
        return target.to(hidden.dtype if linear is None else linear.dtype)

    def __enter__(self) -> AttentionTransfer:
        if self.needs_layer_outputs:
            self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        else:  # an instance attribute shadows the class's forward; nn.Module.__call__ still calls it
            for module in self.modules:
                module.forward = functools.partial(self._parent_only, module)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for module in self.modules:
            module.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def paused(self):
        """The layers' own forward back for the duration: evaluating mid-stage must measure the linear model, not
        the softmax outputs passed on while the transfer is active."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()

    def loss(self) -> torch.Tensor:
        """Mean over layers of the losses recorded since the last call; clears them."""
        if not self.losses:
            raise LinspecError(
                "attention transfer recorded no layer loss: is the model a linspec model, and (loss far_attention) "
                "are the sequences longer than the window and its sinks?"
            )
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


def far_attention_loss(
    module: LinspecAttention, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor | None:
    """The far attention KL of one layer call (``linspec.train.far_attention``) with its parent's RoPE'd q/k and
    the layer's window as it is now (a training-time size override included); None when no row has evicted a
    token. Computed with gradients on even inside a forward that runs without them."""
    window = module.softmax_window()
    term = next((t for t in module.terms if t.name == "window"), None)
    if window is None or term is None or term.memory_map == "none":
        raise LinspecError("loss far_attention needs a softmax window with a far memory (preset window-hedgehog)")
    with torch.no_grad():
        q, k, _ = parent_projections(module, hidden_states)
        cos, sin = position_embeddings
        rotated_q, rotated_k = hf.apply_rotary_pos_emb(q, k, cos, sin)
        sink_q = None
        at = window.last_true_position
        if module.settings.sink_positions == "adjacent" and at < q.shape[2]:
            sink_q, _ = hf.apply_rotary_pos_emb(q, q, cos[:, at : at + 1], sin[:, at : at + 1])
    dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # as the layer computes
    sink_q = None if sink_q is None else sink_q.to(dtype)
    with torch.enable_grad():
        return far_attention_kl(rotated_q.to(dtype), rotated_k.to(dtype), window, term.far_memory(dtype), sink_q)
