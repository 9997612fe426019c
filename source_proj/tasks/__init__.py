"""What a model's loss and measurement mean (``task``, ``text`` for language models) and their
per-example gradients (``gradients``).
"""
