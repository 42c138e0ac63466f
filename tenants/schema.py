"""The OpenAPI schema: the authentication classes (drf-spectacular extensions), component names,
and the conventions every operation shares (list envelopes, documented errors)."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from rest_framework.serializers import ListSerializer


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "prly_<prefix>_<secret>",
            "description": "A Parley API key: `Authorization: Bearer prly_…`.",
        }


class JwtScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.TenantJWTAuthentication"
    name = "jwt"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token from POST /api/v1/auth/token/ on the tenant's host.",
        }


class OAuth2Scheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.TenantOAuth2Authentication"
    name = "oauth2"

    def get_security_definition(self, auto_schema):
        scopes = {
            "chat": "Chat with bots",
            "knowledge:read": "Read knowledge",
            "knowledge:write": "Write knowledge",
            "admin": "Administer the tenant",
        }
        return {
            "type": "oauth2",
            "flows": {
                "authorizationCode": {"authorizationUrl": "/o/authorize/", "tokenUrl": "/o/token/", "scopes": scopes},
                "clientCredentials": {"tokenUrl": "/o/token/", "scopes": scopes},
            },
        }


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.authentication.TenantSessionAuthentication"
    name = "session"

    def get_security_definition(self, auto_schema):
        return {"type": "apiKey", "in": "cookie", "name": "sessionid"}


# --- the API's conventions, applied to every operation -------------------------------------------

# Nested serializers named after their role only (``MeApi.OutputSerializer``) would all become the
# component "Output" — the first one wins and every other operation is misdescribed. Those get
# their view's name in front ("MeOutput", "TokenObtainInput").
_ROLE_NAMES = frozenset({"Input", "Output", "Created", "Query"})


class ParleyAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema with component names unique per view."""

    def _get_serializer_name(self, serializer, direction, bypass_extensions=False) -> str:
        name = super()._get_serializer_name(serializer, direction, bypass_extensions)
        serializer_class = type(serializer.child if isinstance(serializer, ListSerializer) else serializer)
        owner, _, _ = serializer_class.__qualname__.rpartition(".")
        if name in _ROLE_NAMES and owner:
            return owner.rpartition(".")[2].removesuffix("Api") + name
        return name


ERROR_SCHEMA = {
    "type": "object",
    "description": "Every error, in OpenAI's shape (OpenAI SDKs surface it as they would OpenAI's).",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "description": "invalid_request_error, authentication_error, …"},
                "code": {"type": "string", "description": "Machine-readable: invalid_request, not_found, …"},
                "param": {"type": "string", "nullable": True, "description": "The field at fault, if any."},
            },
            "required": ["message", "type", "code", "param"],
        }
    },
    "required": ["error"],
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}

# Why each status can come back; which operation can get which is decided by `_error_statuses`.
_ERROR_DESCRIPTIONS = {
    400: "Invalid input (a field named in `param`), unknown fields, malformed JSON.",
    401: "No credential, or an invalid, expired or revoked one.",
    402: "A hard token budget is exhausted (`insufficient_quota`).",
    403: "The credential lacks the scope, the tenant is suspended, a plan limit, or a refused origin.",
    404: "No such object in this tenant (or not visible to this caller).",
    409: "The object's state does not allow this now.",
    413: "The request body is too large.",
    415: "The body's media type (or a document's real type) is not supported.",
    429: "Too many requests, or too many failed credentials from this address; see `Retry-After`.",
    503: "A dependency (Redis, the database) is unreachable; nothing was done. Retry.",
    504: "The answer took too long.",
}


def _starts_a_turn(method: str, operation: dict) -> bool:
    """A POST that can answer with an event stream starts a chat turn (admission, budgets)."""
    return method == "post" and any(
        "text/event-stream" in (response.get("content") or {}) for response in operation["responses"].values()
    )


def _error_statuses(method: str, operation: dict) -> set[int]:
    statuses = {401, 403, 429}  # credentials (or their absence), scopes, suspension; brute-force limits
    parameters = operation.get("parameters") or []
    if any(parameter["in"] == "path" for parameter in parameters):
        statuses.add(404)
    if any(parameter["in"] == "query" for parameter in parameters):
        statuses.add(400)
    if "requestBody" in operation:
        statuses |= {400, 413, 415}
    if _starts_a_turn(method, operation):
        statuses |= {400, 402, 404, 504}
    return statuses


def _envelope(schema: dict) -> dict:
    return {
        "type": "object",
        "properties": {"object": {"type": "string", "enum": ["list"]}, "data": schema},
        "required": ["object", "data"],
    }


def _refs(schema: dict) -> set[str]:
    """Names of the components a schema refers to, at any depth of its own."""
    names: set[str] = set()
    if isinstance(schema, dict):
        if "$ref" in schema:
            names.add(schema["$ref"].rpartition("/")[2])
        for value in schema.values():
            names |= _refs(value)
    elif isinstance(schema, list):
        for value in schema:
            names |= _refs(value)
    return names


def _strict_request_bodies(result: dict) -> None:
    """Request bodies refuse fields they do not declare (StrictSerializer): say so in the schema,
    for every component a body uses, however deep."""
    components = result.get("components", {}).get("schemas", {})
    pending = set()
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            pending |= _refs(operation.get("requestBody", {}))
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        component = components.get(name)
        if name in seen or component is None:
            continue
        seen.add(name)
        if component.get("type") == "object" and "properties" in component:
            component["additionalProperties"] = False
        pending |= _refs(component)


def postprocess_api_conventions(result, generator, request, public):
    """Spectacular postprocessing hook: what every operation of the API shares.

    - Lists are served in an envelope, ``{"object": "list", "data": [...]}`` (OpenAI's shape):
      a view declares ``many=True``, the schema shows the envelope.
    - Request bodies refuse undeclared fields (``additionalProperties: false``), as the
      serializers do (tenants.api_base.StrictSerializer).
    - Every operation documents the errors it can return, in the one error shape (tenants.errors),
      from what it takes: credentials, path parameters, query parameters, a body, a chat turn.
      A view documents any other error by its status alone (``409: OpenApiResponse(description=…)``):
      every 4xx and 5xx response gets the error shape here.
    """
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    _strict_request_bodies(result)
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for response in responses.values():
                json_content = (response.get("content") or {}).get("application/json")
                if json_content and json_content.get("schema", {}).get("type") == "array":
                    json_content["schema"] = _envelope(json_content["schema"])
            for status in _error_statuses(method, operation):
                responses.setdefault(str(status), {"description": _ERROR_DESCRIPTIONS[status]})
            for status, response in responses.items():
                if int(status) >= 400:
                    response["content"] = {"application/json": {"schema": _ERROR_REF}}
                    response["description"] = response.get("description") or _ERROR_DESCRIPTIONS.get(int(status), "")
            operation["responses"] = dict(sorted(responses.items()))
    return result
