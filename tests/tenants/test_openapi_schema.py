"""What the OpenAPI schema says about the API's conventions (the responses themselves are checked
against it by test_openapi_conformance.py)."""

from __future__ import annotations

import pytest

ERROR_REF = {"$ref": "#/components/schemas/Error"}


@pytest.fixture(scope="module")
def document(django_db_setup, django_db_blocker) -> dict:
    from django.test import Client

    with django_db_blocker.unblock():
        return Client().get("/api/schema/", HTTP_ACCEPT="application/json").json()


def _operations(document: dict):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            yield method.upper(), path, operation


def _json_schema(response: dict) -> dict:
    return response["content"]["application/json"]["schema"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/api/v1/bots/", id="bots_case"),
        pytest.param("GET", "/api/v1/api-keys/", id="api_keys_case"),
        pytest.param("GET", "/api/v1/conversations/{conversation_id}/messages/", id="messages_case"),
        pytest.param("GET", "/api/v1/knowledge-bases/{kb_id}/documents/", id="documents_case"),
        pytest.param("GET", "/v1/models", id="models_case"),
    ],
)
def test_lists_are_documented_in_their_envelope(document, method, path):
    schema = _json_schema(document["paths"][path][method.lower()]["responses"]["200"])

    assert schema["required"] == ["object", "data"]
    assert schema["properties"]["object"] == {"type": "string", "enum": ["list"]}
    assert schema["properties"]["data"]["type"] == "array"


def test_no_response_is_a_bare_array(document):
    bare = [
        (method, path, status)
        for method, path, operation in _operations(document)
        for status, response in operation["responses"].items()
        if response.get("content", {}).get("application/json", {}).get("schema", {}).get("type") == "array"
    ]

    assert bare == []


def test_every_operation_documents_its_errors_in_the_error_shape(document):
    for method, path, operation in _operations(document):
        errors = {status: response for status, response in operation["responses"].items() if int(status) >= 400}

        assert {"401", "403", "429"} <= set(errors), (method, path)
        assert all(_json_schema(response) == ERROR_REF for response in errors.values()), (method, path)
        if "{" in path:
            assert "404" in errors, (method, path)
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= set(errors), (method, path)
    assert set(document["components"]["schemas"]["Error"]["properties"]["error"]["required"]) == {
        "message",
        "type",
        "code",
        "param",
    }


def test_me_is_described_as_the_caller(document):
    schema = _json_schema(document["paths"]["/api/v1/me/"]["get"]["responses"]["200"])
    component = document["components"]["schemas"][schema["$ref"].rpartition("/")[2]]

    assert set(component["properties"]) == {"tenant", "kind", "scopes", "email", "api_key_id"}


def test_posting_a_message_is_described_as_a_turn_json_or_streamed(document):
    operation = document["paths"]["/api/v1/conversations/{conversation_id}/messages/"]["post"]
    content = operation["responses"]["200"]["content"]
    component = document["components"]["schemas"][content["application/json"]["schema"]["$ref"].rpartition("/")[2]]

    assert set(content) == {"application/json", "text/event-stream"}
    assert set(component["properties"]) == {"generation_id", "user_message", "message"}
    assert {"402", "429"} <= set(operation["responses"])


def test_request_bodies_refuse_undeclared_fields(document):
    for _method, _path, operation in _operations(document):
        for media in operation.get("requestBody", {}).get("content", {}).values():
            name = media["schema"]["$ref"].rpartition("/")[2]

            assert document["components"]["schemas"][name]["additionalProperties"] is False, name
