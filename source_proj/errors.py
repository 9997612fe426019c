"""Exceptions a user can act on. Every message is one sentence: what is wrong and what to do."""

from __future__ import annotations

import itertools
import math
import numbers
import re
from collections.abc import Collection, Sequence


class SourceProjError(Exception):
    """Base class of every error source-proj raises on purpose.

    Attributes:
        subject: where the sentence refuses one argument's value (the ``check_*`` helpers below), the argument as it
            begins the sentence (``"LDSArguments.num_subsets"``, ``"ProjectionArguments.module_dims['fc']"``), else
            ``None``: a caller that knows the argument by another name (the command line, by its option) names it so.
        mentions: other arguments the sentence names with a value, each ``(field, value)``
            (``("FitArguments.average", "checkpoints")``), written ``average='checkpoints'`` (``mention``): the
            command line writes them as options (``--average checkpoints``).
    """

    subject: str | None = None
    mentions: tuple[tuple[str, object], ...] = ()


def mention(field: str, value: object) -> str:
    """How a sentence names the argument ``field`` (``"FitArguments.average"``) set to ``value`` in Python
    (``average='checkpoints'``); an error lists it in its ``mentions`` so that the command line names its option."""
    return f"{field.rpartition('.')[2]}={value!r}"


class TrajectoryError(SourceProjError):
    """A trajectory directory is missing, malformed, or does not match the model."""


class StoreError(SourceProjError):
    """A store is missing, incompatible, locked, corrupted or would be overwritten."""


class TaskError(SourceProjError):
    """The task, the model or the data do not fit together (shapes, labels, parameters)."""


class NumericalError(SourceProjError):
    """A gradient or a curvature matrix is not finite."""


def not_an_instance(value: object, kind: type, what: str, called: str, hint: str) -> str | None:
    """The sentence refusing ``value`` as the ``what`` (``"model"``) when it is not a ``kind`` (``called``, in
    words: ``"torch.nn.Module"``), else ``None``: a class or a function given for what it builds (``Net`` for
    ``Net()``) is named as such; ``hint`` ends other refusals (``"pass the model whose run was recorded."``)."""
    if isinstance(value, kind):
        return None
    name = getattr(value, "__name__", None)
    if isinstance(value, type) or (callable(value) and name):
        if isinstance(value, type):
            return f"The {what} given is the class {name}, not a {called}; pass an instance of it: {name}(...)."
        return f"The {what} given is the function {name}, not a {called}; pass what it returns: {name}()."
    return f"The {what} given is a {type(value).__name__}, not a {called}; {hint}"


def refusal(
    error: type[SourceProjError], what: str | None, rest: str, mentions: Sequence[tuple[str, object]] = ()
) -> SourceProjError:
    """``error`` with the sentence ``what`` + ``rest``, ``what`` (the argument it refuses) its subject (``None``: a
    sentence that begins otherwise) and ``mentions`` the other arguments ``rest`` names (``mention``)."""
    err = error((what or "") + rest)
    err.subject = what
    err.mentions = tuple(mentions)
    return err


def check_whole(
    what: str, value: object, minimum: int = 1, error: type[SourceProjError] = TaskError, *, also: str = ""
) -> None:
    """Refuse ``value`` as ``what`` (``"LDSArguments.repeats"``) in one sentence unless it is an integer (a bool is
    not one) ≥ ``minimum``; ``also`` names what else is allowed (``" or 'auto'"``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise refusal(error, what, f" is {value!r}; pass a whole number ≥ {minimum}{also}.")


def check_wholes(
    what: str, values: object, minimum: int = 0, *, increasing: bool = False, error: type[SourceProjError] = TaskError
) -> None:
    """Refuse ``values`` as ``what`` (``"RemovalArguments.seeds"``) in one sentence unless it is a non-empty sequence
    of whole numbers ≥ ``minimum`` (strictly ``increasing`` where asked)."""
    whole = isinstance(values, Sequence) and not isinstance(values, str | bytes) and len(values) > 0
    whole = whole and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum for v in values)
    if not whole or (increasing and any(a >= b for a, b in itertools.pairwise(values))):  # type: ignore[arg-type]
        order = "increasing " if increasing else ""
        raise refusal(error, what, f" is {values!r}; pass a non-empty tuple of {order}whole numbers ≥ {minimum}.")


def check_names(what: str, values: object) -> None:
    """Refuse ``values`` as ``what`` (``"FitArguments.stages"``) in one sentence unless it is a non-empty sequence of
    names (a lone string is not one: its letters are not stage names)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values or not all(
        isinstance(v, str) for v in values
    ):
        raise refusal(TaskError, what, f" is {values!r}; pass a non-empty tuple of names, e.g. ('main',).")


def check_choice(
    what: str, value: object, allowed: Collection[object], error: type[SourceProjError] = TaskError
) -> None:
    """Refuse ``value`` as ``what`` in one sentence unless it is one of ``allowed`` (``1`` does not pass for
    ``True``)."""
    if not any(isinstance(value, type(option)) and value == option for option in allowed):
        raise refusal(error, what, f" is {value!r}; use one of {', '.join(map(str, allowed))}.")


def check_real(
    what: str, value: object, low: float = 0.0, high: float = math.inf, *, closed: bool = True,
    error: type[SourceProjError] = TaskError,
) -> None:  # fmt: skip
    """Refuse ``value`` as ``what`` in one sentence unless it is a finite real number (not a bool) in
    ``[low, high)``, or ``(low, high)`` where not ``closed``."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if number and (low <= value if closed else low < value) and value < high:  # type: ignore[operator]
        return
    if math.isinf(high):
        above = "" if math.isinf(low) else f" {'≥' if closed else '>'} {low:g}"
        raise refusal(error, what, f" is {value!r}; pass a finite number{above}.")
    raise refusal(error, what, f" is {value!r}; pass a number in {'[' if closed else '('}{low:g}, {high:g}).")


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


_HOST_ALLOCATION = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_OUT_OF_MEMORY_SIGNS = ("can't allocate memory", "not enough memory", "out of memory")


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed for lack of memory: a device's (``torch.OutOfMemoryError``, a
    ``RuntimeError`` that says so) or the host's (torch's CPU allocator raises a plain ``RuntimeError``)."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and any(sign in str(err) for sign in _OUT_OF_MEMORY_SIGNS)


def describe_out_of_memory(err: BaseException) -> str:
    """What could not be allocated, in a few words: ``"CUDA out of memory. Tried to allocate 12.00 GiB"``, ``"the
    host could not allocate 3.2 GiB"``."""
    text = str(err).strip()
    host = _HOST_ALLOCATION.search(text)
    if host is not None:
        return f"the host could not allocate {int(host.group(1)) / 2**30:.1f} GiB"
    return ". ".join(first_line(err).split(". ")[:2]).rstrip(".") or type(err).__name__
