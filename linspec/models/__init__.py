"""Linspec model classes: native HF configs and causal LMs per supported architecture, the layer and its cache."""
