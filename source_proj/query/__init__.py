"""Scoring queries against a fitted store: query features and top-k (``attributor``, ``topk``),
ensembles (``ensemble``) and reports (``report``, ``text_report``).
"""
