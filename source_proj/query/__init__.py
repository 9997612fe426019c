"""Scoring queries against a fitted store: query features and top-k (``attributor``, ``topk``),
ensembles (``ensemble``), per-token scores (``per_token``) and reports (``report``, ``text_report``).
"""
