"""The one domain error type and the one API error format.

Every API error is rendered in the OpenAI error shape so that OpenAI SDKs surface it:
``{"error": {"message": ..., "type": ..., "code": ..., "param": ...}}``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, JsonResponse
from redis import exceptions as redis_exceptions
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response


class ParleyError(Exception):
    """A domain error with an HTTP status, a machine-readable code and a human message."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.param = param
        self.headers = headers or {}


class ValidationFailed(ParleyError):
    status_code = 400
    code = "invalid_request"


class AuthenticationFailed(ParleyError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ParleyError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class TenantSuspended(ParleyError):
    status_code = 403
    error_type = "permission_error"
    code = "tenant_suspended"


class NotFound(ParleyError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Conflict(ParleyError):
    status_code = 409
    code = "conflict"


class ServiceUnavailable(ParleyError):
    """A dependency (Redis, the database) cannot be reached: nothing was done; try again."""

    status_code = 503
    error_type = "api_error"
    code = "service_unavailable"


STORE_RETRY_AFTER_SECONDS = 5


def store_unavailable() -> ServiceUnavailable:
    """What every transport answers while Redis cannot be reached, instead of a 500: a 503 the
    client may retry (``Retry-After``); the request was refused before anything was kept."""
    return ServiceUnavailable(
        "The service is briefly unavailable (its data store cannot be reached); nothing was done. "
        "Please retry shortly.",
        code="store_unavailable",
        headers={"Retry-After": str(STORE_RETRY_AFTER_SECONDS)},
    )


def error_body(*, message: str, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def error_response(error: ParleyError) -> JsonResponse:
    response = JsonResponse(
        error_body(message=error.message, error_type=error.error_type, code=error.code, param=error.param),
        status=error.status_code,
    )
    for name, value in error.headers.items():
        response[name] = value
    return response


_DRF_TYPES: dict[type, tuple[str, str]] = {
    drf_exceptions.ParseError: ("invalid_request_error", "invalid_json"),
    drf_exceptions.UnsupportedMediaType: ("invalid_request_error", "unsupported_media_type"),
    drf_exceptions.NotAuthenticated: ("authentication_error", "missing_credentials"),
    drf_exceptions.AuthenticationFailed: ("authentication_error", "invalid_credentials"),
    drf_exceptions.PermissionDenied: ("permission_error", "permission_denied"),
    drf_exceptions.NotFound: ("not_found_error", "not_found"),
    drf_exceptions.MethodNotAllowed: ("invalid_request_error", "method_not_allowed"),
    drf_exceptions.NotAcceptable: ("invalid_request_error", "not_acceptable"),
    drf_exceptions.Throttled: ("rate_limit_error", "rate_limited"),
}


def flatten_validation(detail: Any, prefix: str = "") -> tuple[str, str | None]:
    """First field error of a DRF ValidationError as ("field: message", "field")."""
    if isinstance(detail, dict):
        for field, value in detail.items():
            name = f"{prefix}.{field}" if prefix else str(field)
            if field == "non_field_errors":
                name = prefix
            message, param = flatten_validation(value, name)
            return message, param
    if isinstance(detail, list) and detail:
        return flatten_validation(detail[0], prefix)
    text = str(detail)
    return (f"{prefix}: {text}" if prefix else text), (prefix or None)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: every error in the OpenAI shape, with the right status."""
    if isinstance(exc, ParleyError):
        return Response(
            error_body(message=exc.message, error_type=exc.error_type, code=exc.code, param=exc.param),
            status=exc.status_code,
            headers=exc.headers,
        )
    if isinstance(exc, redis_exceptions.ConnectionError | redis_exceptions.TimeoutError):
        return api_exception_handler(store_unavailable(), context)  # Redis away: retry, not a 500
    if isinstance(exc, RequestDataTooBig):
        return Response(
            error_body(
                message="Request body is too large.", error_type="invalid_request_error", code="request_too_large"
            ),
            status=413,
        )
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    if isinstance(exc, drf_exceptions.ValidationError):
        message, param = flatten_validation(exc.detail)
        status = 422 if getattr(exc, "semantic", False) else 400
        return Response(
            error_body(message=message, error_type="invalid_request_error", code="invalid_request", param=param),
            status=status,
        )
    if isinstance(exc, drf_exceptions.APIException):
        error_type, code = _DRF_TYPES.get(type(exc), ("invalid_request_error", exc.default_code))
        headers = {}
        if isinstance(exc, drf_exceptions.Throttled):
            wait: float | None = exc.wait  # type: ignore[attr-defined]  # DRF's stub lacks Throttled.wait
            if wait is not None:
                headers["Retry-After"] = str(int(wait))
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        status = exc.status_code
        if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
            status = 401
            headers["WWW-Authenticate"] = 'Bearer realm="api"'
        return Response(
            error_body(message=str(message), error_type=error_type, code=code), status=status, headers=headers
        )
    return None
