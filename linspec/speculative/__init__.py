"""Speculative generation: drafters, tree verification, exact acceptance and state commit."""
