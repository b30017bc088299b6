"""Training recipes that recover quality after conversion: attention transfer, LoRA, distillation.

``load_recipe(path, overrides)`` reads and validates a YAML recipe; ``train(recipe)`` runs it. Read top to bottom:
``run.py`` (the pipeline), ``stages/`` (one module per stage kind), ``loop.py`` (the optimiser loop they share),
``data.py`` and ``chat_data.py`` (what they train on). The command line is ``linspec train RECIPE.yaml [key=value]``.
"""

from linspec.train.recipe import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe", "train"]


def train(recipe: Recipe, **kwargs):
    """Run ``recipe``; see :func:`linspec.train.run.train`."""
    from linspec.train.run import train as run_train

    return run_train(recipe, **kwargs)
