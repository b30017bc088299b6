"""Trained drafters: small modules on the target's own hidden states, trained from the target itself.

* ``medusa`` (:mod:`~linspec.drafting.heads`) — K residual heads on the last hidden state, tree from their top-k.
* ``eagle`` (:mod:`~linspec.drafting.eagle`) — one layer over [feature ; next token's embedding] predicting the
  next feature, autoregressive in feature space, dynamic tree by draft confidence.
* ``redrafter`` (:mod:`~linspec.drafting.redrafter`) — a recurrent cell over token embeddings started from the
  last hidden state, beams merged into a dynamic tree.

Each reads the target's embeddings and (a reduced copy of) its head, so a saved drafter holds only its own
weights; :func:`load_drafter` refuses a drafter trained for another target or tokenizer. Every drafter kind, the
trained ones and those that need no training, is a spec in :mod:`~linspec.drafting.registry`. Training is a stage
of the one training system: ``linspec train <kind>-smollm2-135m`` (:mod:`~linspec.train.stages.drafter`).
"""

import importlib

# public name -> its module, imported on first use: the drafter registry (which ``--help`` reads) loads no torch
_EXPORTS = {
    "TrainedDrafter": "linspec.drafting.base",
    "load_drafter": "linspec.drafting.store",
    "save_drafter": "linspec.drafting.store",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'linspec.drafting' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
