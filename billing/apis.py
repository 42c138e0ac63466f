"""Usage, CSV export and invoice endpoints of a tenant's API; the billing provider's webhook."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from datetime import date

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from billing import selectors, services
from billing.budgets import current_month
from billing.providers import billing_provider_get
from tenants.api_base import StrictQuerySerializer, TenantAPIView
from tenants.errors import ValidationFailed

MAX_RANGE_DAYS = 366
CSV_PAGE_ROWS = 2_000  # rows per query while streaming: small enough to start at once
_MONTH = re.compile(r"^(?P<year>\d{4})-(?P<month>0[1-9]|1[0-2])$")
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class UsageRangeSerializer(StrictQuerySerializer):
    """``from`` / ``to`` (inclusive, UTC days); defaults: today, and the first day of ``to``'s month."""

    def get_fields(self):
        fields = super().get_fields()
        fields["from"] = serializers.DateField(required=False, input_formats=["%Y-%m-%d"])
        fields["to"] = serializers.DateField(required=False, input_formats=["%Y-%m-%d"])
        return fields

    def validate(self, attrs):
        date_to = attrs.get("to") or selectors.today()
        date_from = attrs.get("from") or date_to.replace(day=1)
        if date_to < date_from:
            raise ValidationFailed("'to' must not be before 'from'.", param="to")
        if (date_to - date_from).days >= MAX_RANGE_DAYS:
            raise ValidationFailed(f"The range may span at most {MAX_RANGE_DAYS} days.", param="to")
        return {**attrs, "from": date_from, "to": date_to}


class UsageQuerySerializer(UsageRangeSerializer):
    group_by = serializers.ChoiceField(choices=selectors.GROUP_BY_CHOICES, default=selectors.GROUP_BY_DAY)


def _query(serializer_class, request) -> dict:
    serializer = serializer_class(data=request.query_params.dict())
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


_RANGE_PARAMETERS = [
    OpenApiParameter("from", str, description="YYYY-MM-DD, inclusive (default: first day of the month of `to`)"),
    OpenApiParameter("to", str, description="YYYY-MM-DD, inclusive (default: today, UTC)"),
]


class UsageCountersSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    cached_requests = serializers.IntegerField()
    tokens_in = serializers.IntegerField()
    tokens_out = serializers.IntegerField()
    cached_tokens = serializers.IntegerField(help_text="Tokens of answers served from the cache (never billed).")
    billable_tokens = serializers.IntegerField()


class UsageRowSerializer(UsageCountersSerializer):
    day = serializers.DateField(required=False, help_text="With group_by=day.")
    bot = serializers.CharField(required=False, help_text="With group_by=bot: the bot's public id.")
    api_key_id = serializers.IntegerField(required=False, allow_null=True, help_text="With group_by=key.")


class UsageOutputSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=["list"])
    group_by = serializers.CharField()
    total = UsageCountersSerializer()

    def get_fields(self):
        # Names a class attribute cannot take: "from" is a keyword, "data" is the serializer's own.
        fields = super().get_fields()
        fields["from"] = serializers.DateField()
        fields["to"] = serializers.DateField()
        fields["data"] = UsageRowSerializer(many=True)
        return fields


class UsageApi(TenantAPIView):
    required_scopes = {"GET": "admin"}

    @extend_schema(
        parameters=[*_RANGE_PARAMETERS, OpenApiParameter("group_by", str, enum=selectors.GROUP_BY_CHOICES)],
        responses=UsageOutputSerializer,
    )
    def get(self, request):
        query = _query(UsageQuerySerializer, request)
        summary = selectors.usage_summary(
            tenant=request.tenant, date_from=query["from"], date_to=query["to"], group_by=query["group_by"]
        )
        return Response(
            {
                "object": "list",
                "from": query["from"].isoformat(),
                "to": query["to"].isoformat(),
                "group_by": query["group_by"],
                **summary,
            }
        )


class _FirstRenderer(BaseContentNegotiation):
    """The CSV view's errors are JSON whatever the client accepts (its body is not rendered)."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def _csv_cell(value) -> str:
    text = str(value)
    # Spreadsheets run cells that start like a formula: neutralise them (CSV injection).
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


async def _csv_rows(*, tenant, date_from: date, date_to: date) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(selectors.CSV_COLUMNS)
    after = None
    while True:
        rows = await sync_to_async(selectors.usage_daily_page, thread_sensitive=True)(
            tenant=tenant, date_from=date_from, date_to=date_to, after=after, limit=CSV_PAGE_ROWS
        )
        for row in rows:
            counters = [row[name] for name in selectors.COUNTERS]
            billable = row["tokens_in"] + row["tokens_out"] - row["cached_tokens"]
            writer.writerow(
                [row["day"].isoformat(), _csv_cell(row["bot"]), row["api_key_id"] or "", *counters, billable]
            )
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
        if len(rows) < CSV_PAGE_ROWS:
            return
        last = rows[-1]
        after = (last["day"], last["bot"], last["api_key_id"])


class UsageExportApi(TenantAPIView):
    required_scopes = {"GET": "admin"}
    content_negotiation_class = _FirstRenderer

    @extend_schema(parameters=_RANGE_PARAMETERS, responses={(200, "text/csv"): str})
    def get(self, request):
        query = _query(UsageRangeSerializer, request)
        response = StreamingHttpResponse(
            _csv_rows(tenant=request.tenant, date_from=query["from"], date_to=query["to"]),
            content_type="text/csv; charset=utf-8",
        )
        filename = f"usage-{request.tenant.slug}-{query['from'].isoformat()}-{query['to'].isoformat()}.csv"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        response["Cache-Control"] = "no-store"
        return response


class InvoiceQuerySerializer(StrictQuerySerializer):
    month = serializers.CharField(required=False, help_text="YYYY-MM (default: this month)")

    def validate_month(self, value: str) -> str:
        match = _MONTH.match(value)
        if match is None or int(match["year"]) < 2000:
            raise serializers.ValidationError("Use the format YYYY-MM.")
        if value > current_month():
            raise serializers.ValidationError("The month must not be in the future.")
        return value


class InvoicePlanSerializer(serializers.Serializer):
    code = serializers.CharField(source="plan_code", help_text='"" for the default plan')
    name = serializers.CharField(source="plan_name")


class InvoiceLineSerializer(UsageCountersSerializer):
    bot = serializers.CharField()


class InvoiceOutputSerializer(serializers.Serializer):
    object = serializers.SerializerMethodField()
    month = serializers.CharField()
    status = serializers.CharField(help_text="draft (computed live) | issued | paid | payment_failed")
    plan = InvoicePlanSerializer(source="*")
    included_tokens = serializers.IntegerField()
    used_tokens = serializers.IntegerField()
    overage_tokens = serializers.IntegerField()
    price_per_1k_extra_tokens = serializers.DecimalField(max_digits=10, decimal_places=4)
    amount = serializers.DecimalField(max_digits=14, decimal_places=2)
    issued_at = serializers.DateTimeField(allow_null=True)
    lines = InvoiceLineSerializer(many=True)

    def get_object(self, invoice) -> str:
        return "invoice"


class InvoiceApi(TenantAPIView):
    required_scopes = {"GET": "admin"}

    @extend_schema(
        parameters=[OpenApiParameter("month", str, description="YYYY-MM (default: this month)")],
        responses=InvoiceOutputSerializer,
    )
    def get(self, request):
        month = _query(InvoiceQuerySerializer, request).get("month") or current_month()
        invoice = selectors.invoice_for_month(tenant=request.tenant, month=month)
        return Response(InvoiceOutputSerializer(invoice).data)


class BillingWebhookApi(APIView):
    """The billing provider's webhook (public schema). No credentials: the signature is the proof."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(request=None, responses={200: None})
    def post(self, request):
        event = billing_provider_get().verify_webhook(request)
        applied = services.billing_event_apply(event=event)
        return Response(
            {"received": True, "outcome": applied.record.outcome, "duplicate": applied.is_duplicate}, status=200
        )
