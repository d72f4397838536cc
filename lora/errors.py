"""One error tree for all of Mosaic, rooted in :class:`MosaicError`, with the errors every room raises.

An error says what went wrong and whose fault it is, never how a protocol reports it: ``code`` is a stable
name (``model_not_found``, ``invalid_adapter``…) and ``caller_fault`` tells a bad request from a failure
of Mosaic or what it depends on. The HTTP edge maps codes to statuses and OpenAI error types in one
table (server/http/errors.py); the CLI prints the message. Subclasses also inherit the stdlib error a
caller would expect (``KeyError`` for a missing skill, ``ValueError`` for bad input). The one error only
the HTTP edge raises (an upload over its size) lives there.
"""

from __future__ import annotations


class MosaicError(Exception):
    code: str = "internal_error"
    caller_fault: bool = False  # True: the request was wrong (retrying it unchanged fails again)

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class NotFoundError(MosaicError, KeyError):
    code = "model_not_found"
    caller_fault = True


class InvalidRequestError(MosaicError, ValueError):
    code = "invalid_request"
    caller_fault = True


class AdapterValidationError(InvalidRequestError):
    """An adapter failed validation; ``problems`` lists every problem found, not just the first. The message
    names the first ``LISTED`` (each cut to ``PROBLEM_CHARS``) and counts the rest, so its size is bounded."""

    code = "invalid_adapter"
    LISTED = 20
    PROBLEM_CHARS = 300

    def __init__(self, problems: list[str], *, param: str | None = None) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        cut = self.PROBLEM_CHARS
        listed = [p if len(p) <= cut else p[:cut - 1] + "…" for p in self.problems[:self.LISTED]]
        if n > self.LISTED:
            listed.append(f"and {n - self.LISTED:,} more")
        summary = f"adapter refused ({n} problem{'s' if n != 1 else ''}): "
        super().__init__(summary + "; ".join(listed), param=param)


class ConflictError(MosaicError, ValueError):
    code = "conflict"
    caller_fault = True


class UnavailableError(MosaicError, RuntimeError):
    """Something Mosaic depends on (Redis, the engine) cannot answer now; the same request may succeed later."""

    code = "service_unavailable"


class AuthError(MosaicError, PermissionError):
    """No API key, or an unknown or revoked one."""

    code = "invalid_api_key"
    caller_fault = True


class ForbiddenError(MosaicError, PermissionError):
    """A valid API key that may not do this: it lacks the scope, or names skills outside its namespace."""

    code = "insufficient_scope"
    caller_fault = True
