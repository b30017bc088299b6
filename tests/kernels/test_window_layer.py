"""A converted model of the ``window`` preset on the kernels: its softmax window stays on PyTorch's scaled-dot-product
attention, its grouped term (decayed, mean-normalised memory and the conv) and the far memory's readout run on
Triton — in training (forward and backward, through to the decay logits) and in cached decoding — and gives the
PyTorch path's result."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_linspec

from linspec.models import hf
from linspec.models.cache import new_cache_for
from linspec.ops.backend import KernelFallbackWarning, backend

WINDOW = {
    "local_kernel": "softmax",
    "local_window": 6,
    "sink_tokens": 2,
    "sink_positions": "adjacent",
    "global_decay": True,
    "global_norm": "mean",
}


@pytest.fixture(scope="module", params=["window", "window-hedgehog"])
def window_model(request):
    """Built before the function-scoped ``poisoned_outputs`` patch, whose ``torch.empty`` would escape the meta
    device that conversion builds on. ``window-hedgehog`` adds the far memory, whose readout has its own kernel."""
    far = {"memory_feature_map": "hedgehog"} if request.param == "window-hedgehog" else {}
    return tiny_linspec("llama", seed=3, group_size=4, conv_taps=3, **WINDOW, **far).float()


def test_the_window_preset_trains_and_decodes_on_the_kernels(window_model):
    model = window_model
    tokens = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    results = {}
    for name in ("triton", "torch"):
        model.zero_grad()
        with backend(name), warnings.catch_warnings():
            warnings.simplefilter("error", KernelFallbackWarning)  # no op of this preset may fall back
            model.train()
            logits = model(tokens, use_cache=False).logits  # the chunked form, as in training
            logits.float().square().mean().backward()
            model.eval()
            with torch.no_grad():
                cache = new_cache_for(model)
                prefill = model(tokens[:, :11], use_cache=True, **hf.cache_kwargs(cache)).logits
                steps = [
                    model(tokens[:, t : t + 1], use_cache=True, **hf.cache_kwargs(cache)).logits for t in range(11, 19)
                ]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (logits.detach(), prefill, torch.cat(steps, dim=1), grads)
    kernels, torch_path = results["triton"], results["torch"]
    for what, a, b in zip(["training logits", "prefill", "decode"], kernels[:3], torch_path[:3], strict=True):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item()), what
    assert torch.allclose(kernels[2], kernels[0][:, 11:], atol=1e-4)  # decoding continues the same sequence
    decay_grads = [n for n in torch_path[3] if "decay_logit" in n]
    assert decay_grads and all(torch_path[3][n].abs().max() > 0 for n in decay_grads)
    for name, grad in torch_path[3].items():
        assert (kernels[3][name] - grad).abs().max() <= 1e-4 * max(1.0, grad.abs().max().item()), name
