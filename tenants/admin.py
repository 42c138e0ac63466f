"""The platform operator's Django admin (public schema only): tenants, domains, users, keys.

Tenant writes go through the services so that provisioning, suspension and deletion do exactly
what the API and the management commands do (schema, caches, Redis keys, files).
"""

from __future__ import annotations

from typing import ClassVar

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin

from tenants import services
from tenants.models import ApiKey, Domain, Membership, PublicBot, Tenant, User


class DomainInline(admin.TabularInline):
    model = Domain
    extra = 0


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "status", "plan", "schema_name", "created_at"]
    list_filter = ["status", "plan"]
    search_fields = ["slug", "name"]
    readonly_fields = ["schema_name", "status", "suspended_reason", "created_at"]
    inlines = [DomainInline, MembershipInline]
    actions = ["suspend", "reactivate"]

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, "slug"] if obj else self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        created = services.tenant_create(name=obj.name, slug=obj.slug, plan_code=obj.plan.code if obj.plan else None)
        type(obj).objects.filter(pk=created.pk).update(conversation_retention_days=obj.conversation_retention_days)
        obj.pk, obj.schema_name = created.pk, created.schema_name
        obj._state.adding = False

    def delete_model(self, request, obj):
        services.tenant_delete(tenant=obj)

    def delete_queryset(self, request, queryset):
        for tenant in queryset:
            services.tenant_delete(tenant=tenant)

    @admin.action(description="Suspend selected tenants")
    def suspend(self, request, queryset):
        for tenant in queryset:
            services.tenant_suspend(tenant=tenant, reason=f"suspended by {request.user.email}")
        self.message_user(request, f"Suspended {queryset.count()} tenant(s).", messages.WARNING)

    @admin.action(description="Reactivate selected tenants")
    def reactivate(self, request, queryset):
        for tenant in queryset:
            services.tenant_activate(tenant=tenant)
        self.message_user(request, f"Reactivated {queryset.count()} tenant(s).")


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    ordering = ["email"]
    list_display = ["email", "full_name", "is_staff", "is_active", "date_joined"]
    search_fields = ["email", "full_name"]
    fieldsets = [
        (None, {"fields": ["email", "password", "full_name"]}),
        ("Permissions", {"fields": ["is_active", "is_staff", "is_superuser"]}),
    ]
    add_fieldsets = [(None, {"classes": ["wide"], "fields": ["email", "password1", "password2"]})]
    filter_horizontal: ClassVar[list[str]] = []
    list_filter = ["is_staff", "is_active"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "tenant", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at"]
    list_filter = ["tenant"]
    search_fields = ["prefix", "name"]
    readonly_fields = [f.name for f in ApiKey._meta.fields]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # keys are created by tenants (or `manage.py api_key_create`): the secret is shown once

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            services.api_key_revoke(api_key=api_key)


admin.site.register(PublicBot)
admin.site.site_header = "Parley operator console"
