"""One error tree for all of Mosaic, rooted in :class:`MosaicError`, and the store's errors in it.

Each error carries the HTTP status and OpenAI error ``type``/``code`` it maps to, so the
HTTP boundary (server/errors.py) translates them in one place. Subclasses also inherit the stdlib
error a caller would expect (``KeyError`` for a missing skill, ``ValueError`` for bad input).
Errors only the server raises (authentication, scopes, upload size) live in server/errors.py.
"""

from __future__ import annotations


class MosaicError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class NotFoundError(MosaicError, KeyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class InvalidRequestError(MosaicError, ValueError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


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
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class UnavailableError(MosaicError, RuntimeError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
