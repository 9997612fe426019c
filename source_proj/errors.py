"""Exceptions a user can act on. Every message is one sentence: what is wrong and what to do."""

from __future__ import annotations


class SourceProjError(Exception):
    """Base class of every error source-proj raises on purpose."""


class TrajectoryError(SourceProjError):
    """A trajectory directory is missing, malformed, or does not match the model."""


class StoreError(SourceProjError):
    """A store is missing, incompatible, locked, corrupted or would be overwritten."""


class TaskError(SourceProjError):
    """The task, the model or the data do not fit together (shapes, labels, parameters)."""


class NumericalError(SourceProjError):
    """A gradient or a curvature matrix is not finite."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
