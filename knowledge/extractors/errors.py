"""The one error type extraction raises: a message fit to show a tenant, plus a machine-readable code."""

from __future__ import annotations


class ExtractionError(Exception):
    """A document could not be turned into text.

    ``str(error)`` is a human-readable message (stored as the document's error and shown to the tenant);
    ``code`` is a short machine code (``unsupported_type``, ``empty_document``, ``invalid_text``,
    ``encrypted_pdf``, ``corrupt_file``, ``archive_too_large``, ``too_many_pages``).
    """

    code: str

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"ExtractionError({str(self)!r}, code={self.code!r})"
