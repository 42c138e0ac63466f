from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from tenants.errors import ParleyError
from tenants.models import ApiKey
from tenants.selectors import tenant_get_by_slug
from tenants.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a tenant. The key is printed once, alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", required=True)
        parser.add_argument(
            "--scopes", default=",".join(ApiKey.Scope.values), help="Comma-separated; default: every scope."
        )
        parser.add_argument("--expires-in-days", type=int)

    def handle(self, *args, **options):
        expires_at = None
        if options["expires_in_days"] is not None:
            expires_at = timezone.now() + timedelta(days=options["expires_in_days"])
        try:
            tenant = tenant_get_by_slug(slug=options["slug"])
            created = api_key_create(
                tenant=tenant,
                name=options["name"],
                scopes=[s.strip() for s in options["scopes"].split(",") if s.strip()],
                expires_at=expires_at,
            )
        except ParleyError as error:
            raise CommandError(error.message) from error
        self.stdout.write(
            f"created key {created.api_key.prefix} for {tenant.slug} with scopes {','.join(created.api_key.scopes)}"
        )
        self.stdout.write(created.raw_key)
