"""Scoring: feature extractors (features.py), FID / IS / precision-recall (metrics.py), per-image
reconstruction metrics (reconstruction.py) and ADM-layout sample files (npz.py)."""
