"""Billing providers: what a payment processor must offer Parley, and the built-in signed webhook.

A provider only *verifies and translates* its webhook into a ``WebhookEvent``; what an event does
to a tenant is decided once, in ``billing.services.billing_event_apply``. A Stripe-like provider
is a new ``BillingProvider`` subclass registered in ``PROVIDERS``; nothing else changes.

The built-in ``SignedWebhookProvider`` expects::

    POST /api/v1/billing/webhook/
    Parley-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">
    {"id": "evt_…", "type": "payment.succeeded" | "payment.failed", "created": <unix seconds>,
     "data": {"customer_id": "cus_…", "invoice_month": "YYYY-MM" (optional)}}

Several ``v1=`` values may be sent (while the secret is rotated); one matching is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from tenants.errors import ParleyError

PAYMENT_SUCCEEDED = "payment.succeeded"
PAYMENT_FAILED = "payment.failed"
DEFAULT_TOLERANCE_SECONDS = 300


class WebhookRejected(ParleyError):
    """The webhook is not provably from the provider (or not readable): nothing is changed."""

    status_code = 400
    code = "invalid_signature"


class WebhookNotConfigured(ParleyError):
    status_code = 503
    error_type = "api_error"
    code = "webhook_not_configured"


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    provider: str
    event_id: str
    event_type: str
    customer_id: str
    occurred_at: datetime | None
    invoice_month: str = ""
    payload: dict[str, Any] = field(default_factory=dict)


class BillingProvider(ABC):
    name: str

    @abstractmethod
    def verify_webhook(self, request: HttpRequest) -> WebhookEvent:
        """The verified event of a webhook request; raises WebhookRejected otherwise."""


class SignedWebhookProvider(BillingProvider):
    name = "parley"
    signature_header = "Parley-Signature"

    def __init__(
        self,
        *,
        secret: str,
        tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.tolerance_seconds = tolerance_seconds
        self.clock = clock

    @staticmethod
    def sign(body: bytes, *, secret: str, timestamp: int) -> str:
        """The header value a sender puts on ``body`` (also what tests use)."""
        digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        return f"t={timestamp},v1={digest}"

    def verify_webhook(self, request: HttpRequest) -> WebhookEvent:
        if not self.secret:
            raise WebhookNotConfigured("The billing webhook has no secret configured; it accepts nothing.")
        header = request.headers.get(self.signature_header, "")
        timestamp, signatures = self._parse_header(header)
        if abs(self.clock() - timestamp) > self.tolerance_seconds:
            raise WebhookRejected(
                f"The signature timestamp is more than {self.tolerance_seconds} seconds away from now.",
                code="signature_expired",
                param=self.signature_header,
            )
        body = request.body
        expected = hmac.new(self.secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        # Compare against every candidate without stopping early: constant time per candidate.
        matched = False
        for candidate in signatures:
            matched |= hmac.compare_digest(expected, candidate)
        if not matched:
            raise WebhookRejected("The webhook signature does not match.", param=self.signature_header)
        return self._event(body)

    def _parse_header(self, header: str) -> tuple[int, list[str]]:
        timestamp: int | None = None
        signatures: list[str] = []
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            if name == "t" and value.isdigit():
                timestamp = int(value)
            elif name == "v1" and value:
                signatures.append(value)
        if timestamp is None or not signatures:
            raise WebhookRejected(
                f"Send the '{self.signature_header}: t=<unix time>,v1=<hex HMAC-SHA256>' header.",
                code="missing_signature",
                param=self.signature_header,
            )
        return timestamp, signatures

    def _event(self, body: bytes) -> WebhookEvent:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WebhookRejected("The webhook body is not JSON.", code="invalid_json") from error
        if not isinstance(payload, dict):
            raise WebhookRejected("The webhook body must be a JSON object.", code="invalid_request")
        event_id, event_type = payload.get("id"), payload.get("type")
        data = payload.get("data")
        if not isinstance(data, dict):
            data = {}
        if not isinstance(event_id, str) or not event_id or len(event_id) > 200:
            raise WebhookRejected("'id' must be a string of 1-200 characters.", code="invalid_request", param="id")
        if not isinstance(event_type, str) or not event_type or len(event_type) > 100:
            raise WebhookRejected("'type' must be a non-empty string.", code="invalid_request", param="type")
        customer_id = data.get("customer_id", "")
        if not isinstance(customer_id, str) or len(customer_id) > 200:
            raise WebhookRejected("'data.customer_id' must be a string.", code="invalid_request", param="data")
        created = payload.get("created")
        occurred_at = None
        if isinstance(created, int) and not isinstance(created, bool) and created > 0:
            occurred_at = datetime.fromtimestamp(created, tz=UTC)
        invoice_month = data.get("invoice_month", "")
        return WebhookEvent(
            provider=self.name,
            event_id=event_id,
            event_type=event_type,
            customer_id=customer_id,
            occurred_at=occurred_at,
            invoice_month=invoice_month if isinstance(invoice_month, str) else "",
            payload=payload,
        )


def _signed_webhook_provider() -> BillingProvider:
    return SignedWebhookProvider(
        secret=getattr(settings, "PARLEY_BILLING_WEBHOOK_SECRET", ""),
        tolerance_seconds=getattr(settings, "PARLEY_BILLING_WEBHOOK_TOLERANCE_SECONDS", DEFAULT_TOLERANCE_SECONDS),
    )


PROVIDERS: dict[str, Callable[[], BillingProvider]] = {"parley": _signed_webhook_provider}


def billing_provider_get() -> BillingProvider:
    """The configured provider (``PARLEY_BILLING_PROVIDER``, default the signed webhook)."""
    return PROVIDERS[getattr(settings, "PARLEY_BILLING_PROVIDER", "parley")]()
