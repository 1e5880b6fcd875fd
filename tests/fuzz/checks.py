"""Assertions the decoder targets share: which errors are allowed, and that what comes out can be printed.

Hypothesis raises the interpreter's recursion limit while a test runs (by up
to 2000 frames), which hides the ``RecursionError`` an app or a log line
meets when it prints a value nested about 1000 deep. The targets therefore
decode and print under :func:`default_recursion_limit`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from kmux.errors import KmuxError

#: CPython's default ``sys.getrecursionlimit()``.
PYTHON_DEFAULT_RECURSION_LIMIT = 1000


@contextlib.contextmanager
def default_recursion_limit() -> Iterator[None]:
    raised = sys.getrecursionlimit()
    sys.setrecursionlimit(PYTHON_DEFAULT_RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(raised)


def check_error(exc: KmuxError, allowed: tuple[type[KmuxError], ...]) -> None:
    """``exc`` is one of the decoder's documented errors, with its own code, and prints."""
    assert isinstance(exc, allowed), f"{type(exc).__name__} is not one of {[a.__name__ for a in allowed]}"
    # The root class keeps a code this library does not know (a newer daemon's).
    assert exc.code == type(exc).code if type(exc) is not KmuxError else isinstance(exc.code, str)
    with default_recursion_limit():
        assert str(exc)


class _Refused:
    def __repr__(self) -> str:
        return "REFUSED"


#: What :func:`decode_or_refuse` returns when the decoder refused its input.
REFUSED = _Refused()


def decode_or_refuse(decode, data, allowed: tuple[type[KmuxError], ...], show=repr):
    """``decode(data)``, printed with ``show`` as an app or a log line would, under
    Python's default recursion limit; :data:`REFUSED` once the error it raised
    passed :func:`check_error`. Any other exception fails the target."""
    try:
        with default_recursion_limit():
            value = decode(data)
            assert show(value)
    except KmuxError as exc:
        check_error(exc, allowed)
        return REFUSED
    return value
