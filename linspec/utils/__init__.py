"""Foundations every layer may use and that use no other part of linspec: atomic writes (``io``), names that become
paths and the cache root (``paths``), bounded numbers from users (``validation``), device and dtype choice
(``devices``), the versions in use (``environment``), progress bars (``progress``) and where results are written
(``results``). Nothing here imports torch models, transformers internals or any linspec package above it.
"""
