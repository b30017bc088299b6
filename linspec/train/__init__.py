"""Training recipes that recover quality after conversion: attention transfer, LoRA, distillation.

``load_recipe(path, overrides)`` reads and validates a YAML recipe; ``train(recipe)`` runs it (see ``run.py``,
readable top to bottom). The command line is ``linspec train RECIPE.yaml [key=value ...]``.
"""

from linspec.train.recipe import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe", "train"]


def train(recipe: Recipe, **kwargs):
    """Run ``recipe``; see :func:`linspec.train.run.train`."""
    from linspec.train.run import train as run_train

    return run_train(recipe, **kwargs)
