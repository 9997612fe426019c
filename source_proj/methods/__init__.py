"""Attribution methods fitted on a featurized store: SOURCE's formulas (``source``) and its fit
(``fit``), the Kronecker curvature in the full parameter space (``kronecker``), and the baselines in the
same store (``baselines``).
"""
