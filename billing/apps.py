from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from billing.models import ApiKeyBudget, Plan, TenantBilling
        from tenants.config_epoch import config_models_watch
        from tenants.models import Tenant

        # The gateway's policy (plan, budgets, key overrides) is cached per configuration epoch.
        config_models_watch(Plan, TenantBilling, ApiKeyBudget, Tenant)
