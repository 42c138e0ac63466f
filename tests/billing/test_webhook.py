"""The billing provider's signed webhook: payment events suspend and reactivate tenants, once."""

from __future__ import annotations

import json
import time

import pytest
from django.test import RequestFactory

from billing.models import BillingEvent, Invoice, TenantBilling
from billing.providers import SignedWebhookProvider, WebhookRejected
from billing.services import tenant_billing_update
from tenants.models import Tenant
from tenants.services import tenant_suspend

pytestmark = pytest.mark.django_db

SECRET = "whsec_test_secret"
URL = "/api/v1/billing/webhook/"


@pytest.fixture(autouse=True)
def _billing_urls_and_secret(settings):
    settings.ROOT_URLCONF = "tests.billing.urls"
    settings.PUBLIC_SCHEMA_URLCONF = "tests.billing.urls"
    settings.PARLEY_BILLING_WEBHOOK_SECRET = SECRET


@pytest.fixture
def acme(tenant_pair) -> Tenant:
    tenant_billing_update(tenant=tenant_pair.a, billing_customer_id="cus_acme")
    return Tenant.objects.get(pk=tenant_pair.a.pk)


def payload(event_id: str = "evt_1", event_type: str = "payment.failed", **data) -> dict:
    return {
        "id": event_id,
        "type": event_type,
        "created": data.pop("created", int(time.time())),
        "data": {"customer_id": "cus_acme", **data},
    }


def post(
    client, body: dict | bytes, *, secret: str = SECRET, timestamp: int | None = None, signature: str | None = None
):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if signature is None:
        signature = SignedWebhookProvider.sign(raw, secret=secret, timestamp=timestamp or int(time.time()))
    return client.post(URL, raw, content_type="application/json", HTTP_PARLEY_SIGNATURE=signature)


def state(tenant) -> tuple[str, str, str]:
    tenant = Tenant.objects.get(pk=tenant.pk)
    return tenant.status, tenant.suspended_reason, TenantBilling.objects.get(tenant=tenant).status


def test_a_failed_payment_suspends_the_tenant(client, acme):
    response = post(client, payload())

    assert response.status_code == 200
    assert response.json() == {"received": True, "outcome": "applied", "duplicate": False}
    assert state(acme) == ("suspended", "payment_failed", "past_due")
    event = BillingEvent.objects.get()
    assert (event.provider, event.event_id, event.event_type, event.customer_id, event.tenant_id, event.outcome) == (
        "parley",
        "evt_1",
        "payment.failed",
        "cus_acme",
        acme.pk,
        "applied",
    )


def test_a_successful_payment_reactivates_a_tenant_suspended_for_payment(client, acme):
    post(client, payload("evt_1", "payment.failed"))

    response = post(client, payload("evt_2", "payment.succeeded"))

    assert response.json()["outcome"] == "applied"
    assert state(acme) == ("active", "", "active")


def test_a_successful_payment_does_not_lift_an_operators_suspension(client, acme):
    tenant_suspend(tenant=acme, reason="suspended by ops@parley.test")

    response = post(client, payload("evt_1", "payment.succeeded"))

    assert response.json()["outcome"] == "applied"
    assert state(acme) == ("suspended", "suspended by ops@parley.test", "active")


def test_a_redelivered_event_is_applied_once(client, acme):
    post(client, payload("evt_1", "payment.failed"))
    Tenant.objects.filter(pk=acme.pk).update(status="active", suspended_reason="")  # support stepped in

    response = post(client, payload("evt_1", "payment.failed"))

    assert response.status_code == 200
    assert response.json() == {"received": True, "outcome": "applied", "duplicate": True}
    assert state(acme) == ("active", "", "past_due")
    assert BillingEvent.objects.count() == 1


def test_an_event_older_than_the_last_applied_changes_nothing(client, acme):
    now = int(time.time())
    post(client, payload("evt_2", "payment.failed", created=now))

    response = post(client, payload("evt_1", "payment.succeeded", created=now - 60))

    assert response.json()["outcome"] == "stale"
    assert state(acme) == ("suspended", "payment_failed", "past_due")


def test_the_paid_invoice_is_marked(client, acme):
    invoice = Invoice.objects.create(
        tenant=acme,
        month="2026-10",
        included_tokens=0,
        used_tokens=0,
        overage_tokens=0,
        price_per_1k_extra_tokens="0",
        amount="0",
    )

    post(client, payload("evt_1", "payment.succeeded", invoice_month="2026-10"))

    invoice.refresh_from_db()
    assert invoice.status == "paid"


def test_unknown_event_types_are_acknowledged_and_ignored(client, acme):
    response = post(client, payload("evt_1", "customer.updated"))

    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored"
    assert state(acme) == ("active", "", "active")


def test_events_of_unknown_customers_are_acknowledged_and_recorded(client, acme):
    body = payload("evt_1", "payment.failed")
    body["data"]["customer_id"] = "cus_nobody"

    response = post(client, body)

    assert response.json()["outcome"] == "unknown_customer"
    assert BillingEvent.objects.get().tenant_id is None
    assert state(acme) == ("active", "", "active")


def test_a_rotated_secret_is_accepted_alongside_the_old_one(client, acme):
    raw = json.dumps(payload()).encode()
    now = int(time.time())
    old = SignedWebhookProvider.sign(raw, secret="whsec_old", timestamp=now).split("v1=")[1]
    new = SignedWebhookProvider.sign(raw, secret=SECRET, timestamp=now).split("v1=")[1]

    response = post(client, raw, signature=f"t={now},v1={old},v1={new}")

    assert response.status_code == 200


# --- refused requests: nothing changes ------------------------------------------------------------


def _assert_nothing_changed(acme) -> None:
    assert state(acme) == ("active", "", "active")
    assert BillingEvent.objects.count() == 0


@pytest.mark.parametrize(
    ("make_signature", "code"),
    [
        pytest.param(
            lambda raw, now: SignedWebhookProvider.sign(raw, secret="wrong", timestamp=now),
            "invalid_signature",
            id="wrong_secret_case",
        ),
        pytest.param(
            lambda raw, now: SignedWebhookProvider.sign(raw + b" ", secret=SECRET, timestamp=now),
            "invalid_signature",
            id="tampered_body_case",
        ),
        pytest.param(
            lambda raw, now: SignedWebhookProvider.sign(raw, secret=SECRET, timestamp=now).replace(
                f"t={now}", f"t={now - 1}"
            ),
            "invalid_signature",
            id="tampered_timestamp_case",
        ),
        pytest.param(
            lambda raw, now: SignedWebhookProvider.sign(raw, secret=SECRET, timestamp=now - 301),
            "signature_expired",
            id="too_old_case",
        ),
        # A minute past the tolerance: a slow run cannot bring it back inside (301 once did).
        pytest.param(
            lambda raw, now: SignedWebhookProvider.sign(raw, secret=SECRET, timestamp=now + 360),
            "signature_expired",
            id="future_case",
        ),
        pytest.param(lambda raw, now: "", "missing_signature", id="missing_case"),
        pytest.param(lambda raw, now: f"t={now}", "missing_signature", id="no_v1_case"),
        pytest.param(lambda raw, now: "v1=abc", "missing_signature", id="no_timestamp_case"),
        pytest.param(lambda raw, now: f"t={now},v1=", "missing_signature", id="empty_v1_case"),
    ],
)
def test_bad_signatures_are_400_and_change_nothing(client, acme, make_signature, code):
    raw = json.dumps(payload()).encode()

    response = post(client, raw, signature=make_signature(raw, int(time.time())))

    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["param"] == "Parley-Signature"
    _assert_nothing_changed(acme)


def test_a_signature_within_the_tolerance_is_accepted(client, acme):
    response = post(client, payload(), timestamp=int(time.time()) - 290)

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        pytest.param(b"{not json", "invalid_json", None, id="not_json_case"),
        pytest.param(b"[1, 2]", "invalid_request", None, id="not_object_case"),
        pytest.param(json.dumps({"type": "payment.failed"}).encode(), "invalid_request", "id", id="no_id_case"),
        pytest.param(json.dumps({"id": "evt_1", "type": 5}).encode(), "invalid_request", "type", id="bad_type_case"),
        pytest.param(
            json.dumps({"id": "evt_1", "type": "payment.failed", "data": {"customer_id": 5}}).encode(),
            "invalid_request",
            "data",
            id="bad_customer_case",
        ),
    ],
)
def test_signed_but_malformed_bodies_are_400_and_change_nothing(client, acme, raw, code, param):
    response = post(client, raw)

    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)
    _assert_nothing_changed(acme)


def test_without_a_configured_secret_nothing_is_accepted(client, acme, settings):
    settings.PARLEY_BILLING_WEBHOOK_SECRET = ""

    response = post(client, payload(), secret="")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "webhook_not_configured"
    _assert_nothing_changed(acme)


def test_the_webhook_only_accepts_post(client, acme):
    response = client.get(URL)

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_the_provider_verifies_against_its_own_clock():
    raw = json.dumps(payload()).encode()
    request = RequestFactory().post(
        URL,
        raw,
        content_type="application/json",
        HTTP_PARLEY_SIGNATURE=SignedWebhookProvider.sign(raw, secret=SECRET, timestamp=1_000_000),
    )
    provider = SignedWebhookProvider(secret=SECRET, tolerance_seconds=300, clock=lambda: 1_000_300)

    event = provider.verify_webhook(request)

    assert (event.provider, event.event_id, event.event_type, event.customer_id) == (
        "parley",
        "evt_1",
        "payment.failed",
        "cus_acme",
    )
    with pytest.raises(WebhookRejected, match="300 seconds"):
        SignedWebhookProvider(secret=SECRET, clock=lambda: 1_000_301).verify_webhook(request)
