"""Evaluation helpers for evaluate.py: plots drawn from evaluation_stats.json."""
