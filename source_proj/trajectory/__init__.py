"""The training run: checkpoints, learning rates and stages as recorded (``recorder``), the
optimisers SOURCE can model and the segments it cuts a run into (``segments``), Adam's
preconditioner read from the saved optimiser state (``preconditioner``), and the automatic
placement of segment boundaries (``autosegment``).
"""
