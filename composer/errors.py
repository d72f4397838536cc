"""The composer's own errors (the server maps every MosaicError to its status at one boundary)."""

from __future__ import annotations

from adapter_store.errors import MosaicError


class CompositionError(MosaicError, ArithmeticError):
    """The composer produced something unusable (e.g. non-finite values)."""

    status = 422
    type = "invalid_request_error"
    code = "composition_failed"
