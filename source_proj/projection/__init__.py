"""Random projections of per-example gradients: the dense Rademacher and identity maps (``base``),
the per-layer Kronecker map that never materialises gradients (``factored``), TRAK's CUDA kernel
(``fastjl``), and building one from its kind or a store's metadata (``factory``).
"""
