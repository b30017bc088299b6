"""Benchmarks run by ``linspec bench``: each compares ratios inside one run and records them under docs/."""
