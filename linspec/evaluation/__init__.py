"""Measuring a model: perplexity by sliding windows and by context length, component ablations, passkey retrieval
and the retrieval suite scored in one forward per prompt (passkey grid, needle, recall), agreement of greedy answers
with the original, repetition, lm-evaluation-harness, and the one greedy decoder and prompt encoder they share.
Evaluation measures quality; speed belongs to ``linspec.bench``.
"""
