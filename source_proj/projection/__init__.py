"""Projections of per-example gradients: the dense Rademacher and identity maps (``base``), the
per-layer Kronecker map that never materialises gradients (``factored``, on the layers of ``layers``),
the same onto each layer's Kronecker-factor eigenvectors, the default (``eigen``), TRAK's CUDA kernel
(``fastjl``), the maps applied before projection (``transform``: Adam's D^{-1/2}), and building one from
its kind or a store's metadata (``factory``).
"""
