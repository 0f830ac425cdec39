"""Scoring: metrics (MedPy-exact), lesion-wise metrics (panoptica), evaluation and ablation reports."""
