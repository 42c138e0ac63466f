"""JSON request bodies, parsed once and bounded: every transport (DRF views, the ASGI edge,
WebSocket frames) reads its JSON through :func:`json_parse`.

It refuses, with a 400 in the API's error shape, what would otherwise fail later and worse:
nesting deeper than ``MAX_JSON_DEPTH`` (Python's own parser and DRF's recursive serializers raise
``RecursionError``, a 500), and text PostgreSQL cannot store — a NUL character or a lone UTF-16
surrogate, in any string or key at any depth (a row that carries one makes the batch writer's
``INSERT`` fail for every row in its batch).
"""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework.parsers import BaseParser

from tenants.errors import ValidationFailed

MAX_JSON_DEPTH = 32  # the deepest a Parley request needs is 4 (messages → item → content → part)


def json_parse(body: bytes | str) -> Any:
    """The body's JSON, checked by :func:`json_check`; ValidationFailed for anything else."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if "surrogate in string" in str(error):  # an escape (\ud800); raw bytes that are not UTF-8 fall below
            raise ValidationFailed(
                "Text must be valid Unicode: the body has a lone surrogate escape (\\ud800-\\udfff).",
                code="invalid_text",
            ) from None
        if "depth" in str(error):
            raise _too_deep() from None
        raise ValidationFailed("JSON parse error: the body is not valid JSON.", code="invalid_json") from None
    json_check(data)
    return data


def _too_deep() -> ValidationFailed:
    return ValidationFailed(f"JSON nesting is deeper than {MAX_JSON_DEPTH} levels.", code="json_too_deep")


def text_refusal(text: str) -> str | None:
    """Why PostgreSQL would refuse ``text`` (a short reason), or None when it is storable."""
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it has a lone surrogate)"
    return None


def text_sanitise(text: str) -> str:
    """``text`` made storable: NULs dropped, lone surrogates replaced (for text Parley did not
    get from a client, such as a provider's output, which is not refused but cleaned)."""
    if text_refusal(text) is None:
        return text
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def json_check(data: Any) -> None:
    """Refuse nesting deeper than ``MAX_JSON_DEPTH`` and unstorable text anywhere in ``data``.

    Iterative, so that the check itself cannot recurse too deep; a failing string is named by its
    path (``messages.0.content``) in the error's ``param``."""
    stack: list[tuple[Any, int, tuple[str, ...]]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(str(key), path)
                    stack.append((item, depth + 1, (*path, str(key))))
            else:
                stack.extend((item, depth + 1, (*path, str(index))) for index, item in enumerate(value))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    reason = text_refusal(text)
    if reason is not None:
        param = ".".join(path) or None
        raise ValidationFailed(f"{param or 'Text'} {reason}.", param=param, code="invalid_text")


class BoundedJSONParser(BaseParser):
    """DRF's JSON parser through :func:`json_parse` (``REST_FRAMEWORK['DEFAULT_PARSER_CLASSES']``)."""

    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        body = b"" if stream is None else stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(body) > limit:
            raise RequestDataTooBig("Request body is too large.")  # the exception handler's 413
        return json_parse(body)
