"""Public-schema billing models: the operator-defined plans tenants subscribe to."""

from __future__ import annotations

from decimal import Decimal

from django.db import models


class Plan(models.Model):
    code = models.SlugField(max_length=50, unique=True)
    name = models.CharField(max_length=100)
    included_tokens_per_month = models.BigIntegerField(default=1_000_000)
    price_per_1k_extra_tokens = models.DecimalField(max_digits=10, decimal_places=4, default=Decimal("0.0020"))
    requests_per_minute = models.PositiveIntegerField(default=600)
    tokens_per_minute = models.PositiveIntegerField(default=200_000)
    max_documents = models.PositiveIntegerField(default=1_000)
    max_storage_bytes = models.BigIntegerField(default=1024**3)
    max_upload_bytes = models.BigIntegerField(default=25 * 1024**2)
    max_bots = models.PositiveIntegerField(default=10)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return self.name
