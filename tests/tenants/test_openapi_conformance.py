"""The OpenAPI schema against the responses: schemathesis generates requests for every operation
and checks what comes back — no server error, only documented statuses, content types and bodies.

A quick profile (a few examples per operation, in-process over WSGI) so that it runs in every
``make test``; ``PARLEY_SCHEMATHESIS_EXAMPLES`` raises it for a deeper run. Besides the generated
requests, every operation with a JSON body is shown an unknown field, which it must refuse.
"""

from __future__ import annotations

import json
import os
import zlib

import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django_tenants.utils import tenant_context
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from chat import services as chat_services
from knowledge import services as knowledge_services
from tests.factories import make_api_key

# make test's quick profile sends the same requests every run; a deeper run
# (PARLEY_SCHEMATHESIS_EXAMPLES=40) explores new ones each time.
EXAMPLES = int(os.environ.get("PARLEY_SCHEMATHESIS_EXAMPLES", "0")) or 5
IS_QUICK_PROFILE = "PARLEY_SCHEMATHESIS_EXAMPLES" not in os.environ
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    allow_header_conformance,
]


def _openapi_document() -> dict:
    """The schema /api/schema/ serves, generated at collection (no request, no database)."""
    generated = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(OpenApiJsonRenderer().render(generated, renderer_context={}))


# Credentials are the test's own (an admin key, a widget visitor): schemathesis must not generate
# them, or a request it meant to be refused for its credential would carry a valid one.
schema = schemathesis.openapi.from_dict(
    _openapi_document(),
    config=schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}}),
)
schema.app = WSGIHandler()


@pytest.fixture
def _requests_keep_the_test_transaction(widget_visitor):
    """Requests run inside the test's transaction: as Django's test client does, they must not
    close the connection (which would end the transaction) when they start or finish. Set up
    after the test client's requests (the widget visitor's), which connect the handlers again."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def admin_key(db, tenant_pair) -> str:
    _, raw_key = make_api_key(tenant_pair.a, name="schemathesis")
    return raw_key


WIDGET_PAGE = "https://shop.example"


@pytest.fixture
def existing_ids(tenant_pair, admin_key) -> dict[str, str]:
    """Real objects for the path parameters: without them every operation on one object is a 404."""
    other_key, _ = make_api_key(tenant_pair.a, name="another key")
    with tenant_context(tenant_pair.a):
        bot = chat_services.bot_create(name="Schema bot", allowed_origins=[WIDGET_PAGE])
        conversation = chat_services.conversation_create(bot=bot, end_user_kind="api", end_user_id="key:schema")
        knowledge_base = knowledge_services.knowledge_base_create(name="Schema knowledge")
        document, _ = knowledge_services.document_create(
            knowledge_base=knowledge_base, title="Notes", data=b"Parley answers questions.", source="text"
        )
    return {
        "api_key_id": str(other_key.pk),
        "bot_id": bot.public_id,
        "public_id": bot.public_id,  # the widget's routes
        "conversation_id": str(conversation.pk),
        "kb_id": str(knowledge_base.pk),
        "document_id": str(document.pk),
    }


@pytest.fixture
def widget_visitor(client, existing_ids) -> dict[str, str]:
    """A widget visitor on an allowed page: its headers, and a conversation of its own."""
    widget = f"/api/v1/widget/bots/{existing_ids['public_id']}"
    session = client.post(
        f"{widget}/session/", {"visitor_id": "schemathesis-visitor"}, "application/json", HTTP_ORIGIN=WIDGET_PAGE
    )
    headers = {"Authorization": f"Bearer {session.json()['token']}", "Origin": WIDGET_PAGE}
    conversation = client.post(f"{widget}/conversations/", {}, "application/json", headers=headers)
    return {"headers": headers, "conversation_id": conversation.json()["id"]}


# Posting a message with a real conversation starts a chat turn, which waits for a generation
# worker: those operations keep the generated ids (404s), the turn's own tests cover the rest.
STARTS_A_TURN = {
    ("POST", "/api/v1/conversations/{conversation_id}/messages/"),
    ("POST", "/api/v1/widget/bots/{public_id}/conversations/{conversation_id}/messages/"),
}


def _with_existing_ids(case, existing_ids: dict[str, str]) -> None:
    """Every other case (decided by its content, so that hypothesis can replay it) names real objects."""
    parameters = case.path_parameters or {}
    if not parameters or (case.method.upper(), case.path) in STARTS_A_TURN:
        return
    if zlib.crc32(repr(sorted(parameters.items())).encode()) % 2:
        return
    case.path_parameters = {name: existing_ids.get(name, value) for name, value in parameters.items()}


@schema.parametrize()
# No example database: nothing is written into the working tree.
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=IS_QUICK_PROFILE,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.usefixtures("_requests_keep_the_test_transaction")
def test_responses_match_the_openapi_schema(case, admin_key, existing_ids, widget_visitor):
    if case.path.startswith("/api/v1/widget/"):
        _with_existing_ids(case, {**existing_ids, "conversation_id": widget_visitor["conversation_id"]})
        headers = widget_visitor["headers"]
    else:
        _with_existing_ids(case, existing_ids)
        headers = {"Authorization": f"Bearer {admin_key}"}

    case.call_and_validate(headers=headers, checks=CHECKS)


def _operations_with_json_bodies() -> list[tuple[str, str]]:
    """(method, path) of every operation with a JSON body, but the widget's (a visitor token first)."""
    return sorted(
        (method.upper(), path)
        for path, operations in _openapi_document()["paths"].items()
        for method, operation in operations.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
        and not path.startswith("/api/v1/widget/")
    )


@pytest.mark.parametrize(("method", "path"), _operations_with_json_bodies())
def test_unknown_fields_are_refused(client, admin_key, existing_ids, method, path):
    url = path.format(**existing_ids)
    body = json.dumps({"unexpected_field": 1})

    response = client.generic(
        method, url, body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {admin_key}"
    )

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "unexpected_field"
    assert response.json()["error"]["type"] == "invalid_request_error"
