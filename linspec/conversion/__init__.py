"""Turning a softmax model into a linspec model: ``convert`` (in memory, pretrained weights reused), ``checkpoint``
(a source in, an atomically written HF directory out, and ``load``), and the choice of what stays softmax
(``softmax_layers`` and ``softmax_heads``, measured on text with ``auto:N``).
"""
