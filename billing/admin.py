from django.contrib import admin

from billing.models import Plan


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "included_tokens_per_month", "requests_per_minute", "tokens_per_minute", "max_bots"]
    search_fields = ["code", "name"]
