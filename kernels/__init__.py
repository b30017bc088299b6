"""Triton kernels for the chunked, recurrent and verify modes (installed as ``linspec.kernels``)."""
