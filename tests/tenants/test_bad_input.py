"""Bad input gets a clear 4xx in the API's error format, and changes nothing."""

from __future__ import annotations

import pytest

from tenants.models import ApiKey
from tests.factories import bearer, make_api_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def raw_key(tenant_pair):
    return make_api_key(tenant_pair.a)[1]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        pytest.param(
            b'{"name": "x", "scopes": ["chat"', "application/json", 400, "invalid_json", id="malformed_json_case"
        ),
        pytest.param(
            b"name=x&scopes=chat",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
            id="form_content_type_case",
        ),
        pytest.param(b'{"name": "x"}', "text/plain", 415, "unsupported_media_type", id="text_plain_case"),
        pytest.param(
            b'{"name": "\xff\xfe", "scopes": ["chat"]}', "application/json", 400, "invalid_json", id="bad_utf8_case"
        ),
        pytest.param(b'[{"name": "x"}]', "application/json", 400, "invalid_request", id="json_array_case"),
        pytest.param(
            b'{"name": "x", "scopes": ["chat"], "admin": true}',
            "application/json",
            400,
            "invalid_request",
            id="unknown_field_case",
        ),
        pytest.param(
            b'{"name": "x", "scopes": ["root"]}', "application/json", 400, "invalid_request", id="unknown_scope_case"
        ),
        pytest.param(
            b'{"name": "x", "scopes": []}', "application/json", 400, "invalid_request", id="empty_scopes_case"
        ),
        pytest.param(
            b'{"name": "", "scopes": ["chat"]}', "application/json", 400, "invalid_request", id="empty_name_case"
        ),
        pytest.param(
            b'{"name": "x", "scopes": ["chat"], "expires_at": "2001-01-01T00:00:00Z"}',
            "application/json",
            400,
            "invalid_request",
            id="expiry_in_past_case",
        ),
        pytest.param(
            b'{"name": "x", "scopes": ["chat"], "expires_at": "tomorrow"}',
            "application/json",
            400,
            "invalid_request",
            id="bad_datetime_case",
        ),
        pytest.param(
            b'{"name": "\x00", "scopes": ["chat"]}', "application/json", 400, "invalid_json", id="raw_nul_byte_case"
        ),
        pytest.param(
            b'{"name": "a\\u0000b", "scopes": ["chat"]}',
            "application/json",
            400,
            "invalid_text",  # refused at the door, on every endpoint (tenants.json_input)
            id="escaped_nul_byte_case",
        ),
    ],
)
def test_bad_body_case(client, raw_key, body, content_type, status, code):
    count = ApiKey.objects.count()

    response = client.generic("POST", "/api/v1/api-keys/", body, content_type=content_type, **bearer(raw_key))

    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert ApiKey.objects.count() == count


def test_unknown_field_names_the_field(client, raw_key):
    response = client.post(
        "/api/v1/api-keys/",
        {"name": "x", "scopes": ["chat"], "scoeps": ["admin"]},
        content_type="application/json",
        **bearer(raw_key),
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "scoeps"


def test_oversized_body_is_413(client, raw_key, settings):
    count = ApiKey.objects.count()
    body = b'{"name": "' + b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + b'", "scopes": ["chat"]}'

    response = client.generic("POST", "/api/v1/api-keys/", body, content_type="application/json", **bearer(raw_key))

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert ApiKey.objects.count() == count


def test_unknown_api_path_is_json_404(client, raw_key):
    response = client.get("/api/v1/no-such-thing/", **bearer(raw_key))

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_wrong_method_is_405(client, raw_key):
    response = client.put("/v1/models", **bearer(raw_key))

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_malformed_authorization_header_is_401(client, tenant_pair):
    response = client.get("/v1/models", HTTP_AUTHORIZATION="Bearer")

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
