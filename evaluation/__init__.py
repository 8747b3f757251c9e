"""Held-out metrics (metrics.py: eval.json, gates) and the figures of evaluate.py (plots.py)."""
