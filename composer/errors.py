"""The composer's own errors (the HTTP edge maps every MosaicError's code to its status)."""

from __future__ import annotations

from lora.errors import MosaicError


class CompositionError(MosaicError, ArithmeticError):
    """The composer produced something unusable (e.g. non-finite values)."""

    code = "composition_failed"
    caller_fault = True  # the inputs and weights asked for make no usable adapter
