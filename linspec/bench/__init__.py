"""Speed, measured: ``linspec bench`` (decode vs context, prefill, speculative, kernels), each comparing ratios
inside one run and recording them under docs/, and the demo (``linspec demo``). Benchmarks measure; they never
decide behaviour, and quality belongs to ``linspec.evaluation``."""
