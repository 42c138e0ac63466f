import time

from django.core.management.base import BaseCommand, CommandError

from tenants.errors import ParleyError
from tenants.models import User
from tenants.services import tenant_create, user_create


class Command(BaseCommand):
    help = "Create a tenant (schema cloned from the template) with an owner."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--owner-email", required=True)
        parser.add_argument("--owner-password", help="Only used when the owner does not exist yet.")
        parser.add_argument("--plan", dest="plan_code")

    def handle(self, *args, **options):
        started = time.perf_counter()
        try:
            owner = User.objects.filter(email=options["owner_email"].lower()).first()
            if owner is None:
                owner = user_create(email=options["owner_email"], password=options["owner_password"])
            tenant = tenant_create(
                name=options["name"], slug=options["slug"], owner=owner, plan_code=options["plan_code"]
            )
        except ParleyError as error:
            raise CommandError(error.message) from error
        elapsed = time.perf_counter() - started
        self.stdout.write(f"created tenant {tenant.slug} (schema {tenant.schema_name}) in {elapsed:.3f}s")
