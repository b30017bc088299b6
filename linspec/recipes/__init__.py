"""The training recipes shipped with linspec (YAML files beside this one), installed as ``linspec.recipes``.

Run one by name: ``linspec train smollm2-135m-demo``; list them: ``linspec recipes ls``.
"""
