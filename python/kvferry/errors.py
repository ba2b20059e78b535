"""Typed exceptions: one class per absl status code an engine handles differently.

Every error kvferry reports is a :class:`Error`; its message is the library's
status message (which names the offending value) and ``code`` is the absl
code's name, e.g. ``"INVALID_ARGUMENT"``. Where a built-in exception means the
same thing, the class also derives from it, so ``except ValueError`` or
``except TimeoutError`` work as a Python programmer expects.
"""

from __future__ import annotations

import enum

from . import _kvferry


class EndReason(enum.IntEnum):
    """Why a transfer or an offer ended (kvferry::EndReason), to switch on
    instead of reading messages. ``str()`` gives kvferry's name, e.g.
    ``"peer-failed"``; NONE while it runs, once it is done, or when the
    error was bad input refused by the call itself."""

    NONE = 0
    PEER_FAILED = 1
    PEER_DISCONNECTED = 2
    TICKET_REVOKED = 3
    TICKET_EXPIRED = 4
    PEER_TRANSFER_FAILED = 5
    LAYOUT_MISMATCH = 6
    AGENT_SHUT_DOWN = 7
    CANCELLED = 8
    POOL_REMOVED = 9
    UNAUTHENTICATED = 10
    TRANSPORT_ERROR = 11

    def __str__(self) -> str:
        return _kvferry.end_reason_name(int(self))

    @staticmethod
    def _of(value: int) -> "EndReason":
        try:
            return EndReason(value)
        except ValueError:  # a reason newer than this package
            return EndReason.NONE


class Error(Exception):
    """Base class of every kvferry error.

    ``end_reason`` says why the transfer, offer or connection behind it
    ended, as an EndReason (NONE for bad input the call refused itself)."""

    code = "UNKNOWN"
    code_value = 2
    _end_reason = 0

    @property
    def end_reason(self) -> EndReason:
        return EndReason._of(self._end_reason)


class CancelledError(Error):
    """The operation was cancelled (a transfer's cancel(), a revoked offer)."""

    code, code_value = "CANCELLED", 1


class InvalidArgumentError(Error, ValueError):
    """Bad input: the message names the value."""

    code, code_value = "INVALID_ARGUMENT", 3


class DeadlineExceededError(Error, TimeoutError):
    """A wait or a handshake ran out of time; an offer expired."""

    code, code_value = "DEADLINE_EXCEEDED", 4


class NotFoundError(Error, LookupError):
    """Unknown peer, pool or name."""

    code, code_value = "NOT_FOUND", 5


class AlreadyExistsError(Error):
    """A name in use, an existing connection, a layer of an offer already moved."""

    code, code_value = "ALREADY_EXISTS", 6


class PermissionDeniedError(Error):
    """A ticket made for another agent or connection, or altered."""

    code, code_value = "PERMISSION_DENIED", 7


class ResourceExhaustedError(Error):
    """Not enough free blocks, memory or registration."""

    code, code_value = "RESOURCE_EXHAUSTED", 8


class FailedPreconditionError(Error):
    """The state does not allow it: closed agent or peer, layout mismatch,
    an agent used in a forked child."""

    code, code_value = "FAILED_PRECONDITION", 9


class AbortedError(Error):
    """A transfer on an offer that ended while it ran."""

    code, code_value = "ABORTED", 10


class OutOfRangeError(Error, IndexError):
    """A remote block id past the peer's pool."""

    code, code_value = "OUT_OF_RANGE", 11


class InternalError(Error):
    """A failure inside kvferry or UCX."""

    code, code_value = "INTERNAL", 13


class UnavailableError(Error, ConnectionError):
    """The peer failed or is unreachable; its transfers ended."""

    code, code_value = "UNAVAILABLE", 14


class DataLossError(Error):
    code, code_value = "DATA_LOSS", 15


class UnauthenticatedError(Error):
    """The peer does not know this agent's shared secret (or a handshake
    frame was altered on the way)."""

    code, code_value = "UNAUTHENTICATED", 16


_BY_CODE = {
    cls.code_value: cls
    for cls in (
        CancelledError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}
_BY_CODE[-1] = Error
_kvferry._set_error_classes(dict(_BY_CODE))


def from_status(code: int, message: str, reason: int = 0) -> Error | None:
    """The exception for an absl (code, message[, end reason]); None for OK."""
    if code == 0:
        return None
    error = _BY_CODE.get(code, Error)(message)
    error._end_reason = reason
    return error
