"""Bundled sample datasets, one per seed dataset, in each one's own schema (see generate.py)."""
