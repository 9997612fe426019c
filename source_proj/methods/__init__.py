"""Attribution methods fitted on a featurized store: SOURCE's formulas (``source``) and its fit
(``fit``), and the baselines in the same store (``baselines``).
"""
