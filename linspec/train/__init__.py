"""The one training system: recipes that recover quality after conversion (attention transfer, LoRA,
distillation) and that train drafters, as stage kinds on one loop, run directory, checkpoints and resume.

``load_recipe(path, overrides)`` reads and validates a YAML recipe; ``train(recipe)`` runs it. Read top to bottom:
``run.py`` (the pipeline), ``stages/`` (one module per stage kind), ``loop.py`` (the optimiser loop they share),
``state.py`` and ``rundir.py`` (checkpoints and the run directory); what they train on is ``linspec.data``. The
command line is ``linspec train NAME|RECIPE.yaml [key=value]``.
"""

from linspec.train.recipe import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe", "train"]


def train(recipe: Recipe, **kwargs):
    """Run ``recipe``; see :func:`linspec.train.run.train`."""
    from linspec.train.run import train as run_train

    return run_train(recipe, **kwargs)
