"""Projected per-example gradients of every checkpoint into a store: the arguments (``arguments``),
what is computed for which checkpoint and segment (``plan``), the eigen projection's basis pass
(``basis``), Kronecker factor sums (``factors``), the run itself (``featurize``), growing a store
(``grow``), sharded parameters (``sharded``), and in-run capture during training (``capture``, laid out
by ``windows``).
"""
