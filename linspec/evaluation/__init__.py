"""Measuring a model: perplexity by sliding windows and by context length, component ablations, passkey retrieval,
agreement of greedy answers with the original, repetition, lm-evaluation-harness, and the one greedy decoder and
prompt encoder they share. Evaluation measures quality; speed belongs to ``linspec.bench``.
"""
