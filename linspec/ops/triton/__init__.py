"""Triton kernels for CUDA tensors: the chunked form with its backward, the causal conv, the recurrent step, verify,
the far memory's readout — for the paper's memory and the recommended decayed, mean-normalised one.

Each entry point (``chunked.chunked_attention``, ``chunked.grouped_terms``, ``conv.causal_depthwise_conv``,
``recurrent.recurrent_step``, ``verify.verify_attention``, ``readout.run_readout``) has the signature and return of
its PyTorch twin in ``linspec.ops`` and refuses, in one ``ValueError``, a call it does not implement
(``capabilities``: what the kernels carry, readable without triton). ``linspec.ops.backend`` decides per call which
side runs. The kernel modules import triton, and only leaf modules of ``linspec.ops`` (state, memory); this package
itself imports nothing, so naming it costs nothing on a machine without triton.
"""
