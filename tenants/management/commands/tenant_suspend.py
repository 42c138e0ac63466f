from django.core.management.base import BaseCommand, CommandError

from tenants.errors import ParleyError
from tenants.selectors import tenant_get_by_slug
from tenants.services import tenant_activate, tenant_suspend


class Command(BaseCommand):
    help = "Suspend a tenant (every request gets 403 tenant_suspended), or --reactivate it."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--reason", default="")
        parser.add_argument("--reactivate", action="store_true")

    def handle(self, *args, **options):
        try:
            tenant = tenant_get_by_slug(slug=options["slug"])
        except ParleyError as error:
            raise CommandError(error.message) from error
        if options["reactivate"]:
            tenant_activate(tenant=tenant)
            self.stdout.write(f"reactivated {tenant.slug}")
        else:
            tenant_suspend(tenant=tenant, reason=options["reason"])
            self.stdout.write(f"suspended {tenant.slug}")
