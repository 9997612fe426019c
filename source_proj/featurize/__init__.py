"""Projected per-example gradients of every checkpoint into a store: the arguments (``arguments``),
what is computed for which checkpoint and segment (``plan``), and the run itself (``featurize``).
"""
