from django.core.management.base import BaseCommand, CommandError

from tenants.errors import ParleyError
from tenants.selectors import tenant_get_by_slug
from tenants.services import tenant_delete


class Command(BaseCommand):
    help = "Delete a tenant for good: schema, public rows, Redis keys and files."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")

    def handle(self, *args, **options):
        try:
            tenant = tenant_get_by_slug(slug=options["slug"])
        except ParleyError as error:
            raise CommandError(error.message) from error
        if not options["yes"]:
            raise CommandError(f"Refusing to delete {tenant.slug} without --yes.")
        result = tenant_delete(tenant=tenant)
        self.stdout.write(
            f"deleted {options['slug']} (schema {result.schema_name}, {result.redis_keys_deleted} Redis keys)"
        )
